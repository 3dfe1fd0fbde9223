"""Local transformers backend: batched generation with left padding, seeded sampling, a progress bar."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional, Sequence

from ..errors import PipelineError
from ..params.common import Sampling, TransformersBackend
from .base import Conversation, cut_at_stop, prefills

log = logging.getLogger(__name__)


def load_model(path: str | Path, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False):
    """Load an HF-format checkpoint from safetensors only (no pickle), with its tokenizer left-padded for generation."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").exists():
        raise PipelineError(f"{path}: not a model checkpoint (no config.json); run `dvc repro base_model` first")
    if not any(path.glob("*.safetensors")):
        raise PipelineError(f"{path}: no *.safetensors weights (pickle checkpoints are not loaded)")
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    tok.padding_side = "left"  # decoder-only batching: pad on the left so every row ends at its last prompt token
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype), use_safetensors=True, trust_remote_code=trust_remote_code,
        device_map=device if device == "auto" else None,
    )
    if device != "auto":
        model.to(device)
    model.eval()
    return model, tok


class TransformersChatBackend:
    def __init__(self, cfg: TransformersBackend, model=None, tokenizer=None):
        self.cfg = cfg
        if model is None:
            model, tokenizer = load_model(cfg.model, cfg.dtype, cfg.device, cfg.trust_remote_code)
        self.model, self.tok = model, tokenizer
        self.name = f"transformers:{cfg.model}"

    def render(self, conv: Conversation, prefill: Optional[str]) -> str:
        text = self.tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        return text + (prefill or "")

    def generate(self, conversations: Sequence[Conversation], n: int, sampling: Sampling,
                 prefill=None, progress: bool = True, stop: Optional[Sequence[str]] = None) -> List[List[str]]:
        import torch
        from tqdm.auto import tqdm

        texts = [self.render(c, pf) for c, pf in zip(conversations, prefills(prefill, len(conversations)))]
        out: List[List[str]] = []
        bs = self.cfg.batch_size
        bar = tqdm(total=len(texts), desc=f"generate x{n}", unit="prompt", disable=not progress, leave=False)
        for start in range(0, len(texts), bs):
            batch = texts[start:start + bs]
            enc = self.tok(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(self.model.device)
            torch.manual_seed(sampling.seed + start)  # seed per batch: reproducible for the same call
            sample = sampling.temperature > 0
            with torch.inference_mode():
                gen = self.model.generate(
                    **enc,
                    do_sample=sample,
                    temperature=sampling.temperature if sample else None,
                    top_p=sampling.top_p if sample else None,
                    top_k=None,
                    max_new_tokens=sampling.max_new_tokens,
                    num_return_sequences=n,
                    pad_token_id=self.tok.pad_token_id,
                    stop_strings=list(stop) if stop else None,
                    tokenizer=self.tok if stop else None,
                )
            new = gen[:, enc["input_ids"].shape[1]:]  # (len(batch) * n, new_tokens), grouped by input row
            decoded = [cut_at_stop(t, stop) for t in self.tok.batch_decode(new, skip_special_tokens=True)]
            out.extend(decoded[i * n:(i + 1) * n] for i in range(len(batch)))
            bar.update(len(batch))
        bar.close()
        return out

    def close(self) -> None:
        pass
