"""Local transformers backend: batched generation, seeded sampling, a progress bar.

Prompts in one call usually share a long head (the system prompt carrying spec(category) is ~600 tokens; the user
turn is ~50). Encoding that head once and reusing its key/value cache for every row cuts the prompt-encoding work
several-fold on CPU. Rows are laid out as [shared head][padding][own tail], so the cached head sits at the same
positions in every row; position ids come from the attention mask, so the tail continues the head's positions.
"""
from __future__ import annotations

import copy
import functools
import logging
from pathlib import Path
from typing import List, Optional, Sequence

from ..errors import PipelineError
from ..io import check_safetensors_checkpoint
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
    check_safetensors_checkpoint(path)  # every weight file transformers would open is safetensors, and well-formed
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


@functools.lru_cache(maxsize=None)
def reserved_kv_layer_class():
    """A DynamicLayer that appends into a buffer with room for `reserve` more tokens (defined lazily: transformers
    is imported only when a model is used)."""
    from transformers.cache_utils import DynamicLayer

    class ReservedKV(DynamicLayer):
        def __init__(self, reserve: int, keys=None, values=None):
            super().__init__()
            self.reserve = reserve
            self._kbuf = self._vbuf = None
            if keys is not None:
                self.update(keys, values)

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n = self.get_seq_length()
            end = n + key_states.shape[-2]
            kb = self._kbuf
            # a new buffer when there is none, it is full, or keys were replaced behind our back (reorder, select)
            if kb is None or end > kb.shape[-2] or (n and self.keys.data_ptr() != kb.data_ptr()) \
                    or kb.shape[0] != key_states.shape[0]:
                b, h, _, d = key_states.shape
                self._kbuf = key_states.new_empty(b, h, end + self.reserve, d)
                self._vbuf = value_states.new_empty(b, value_states.shape[1], end + self.reserve, value_states.shape[3])
                if n:
                    self._kbuf[:, :, :n] = self.keys
                    self._vbuf[:, :, :n] = self.values
            self._kbuf[:, :, n:end] = key_states
            self._vbuf[:, :, n:end] = value_states
            self.keys, self.values = self._kbuf[:, :, :end], self._vbuf[:, :, :end]
            return self.keys, self.values

    return ReservedKV


def rows_cache(model, head_cache, rows: int, reserve: Optional[int]):
    """A cache for `rows` sequences: the head's keys/values (batch 1) copied into each row, with room for `reserve`
    more tokens. head_cache None gives an empty cache. reserve None, and models with sliding-window or other special
    layers, get transformers' own DynamicCache (same values, slower)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=model.config)
    if reserve is None or any(type(layer) is not DynamicLayer for layer in cache.layers):
        if head_cache is not None:
            cache = copy.deepcopy(head_cache)
            cache.batch_repeat_interleave(rows)
        return cache
    layer_cls = reserved_kv_layer_class()
    if head_cache is None:
        cache.layers = [layer_cls(reserve) for _ in cache.layers]  # sized on the first update
    else:
        cache.layers = [layer_cls(reserve, h.keys.expand(rows, -1, -1, -1), h.values.expand(rows, -1, -1, -1))
                        for h in head_cache.layers]
    return cache


@functools.lru_cache(maxsize=None)
def _cache_kw(forward_cls) -> str:
    import inspect

    params = inspect.signature(forward_cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kw(model) -> str:
    """The keyword a model's forward/generate takes its KV cache by: `cache` from transformers 5.24 on (the old
    `past_key_values` is deprecated there and removed from forward in 5.40), `past_key_values` before."""
    return _cache_kw(type(model))


def shared_prefix_len(rows: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix common to all rows, leaving each row at least one token of its own
    (generate needs one uncached token per row to produce the first logits)."""
    if not rows:
        return 0
    limit = min(len(r) for r in rows) - 1
    first = rows[0]
    n = 0
    while n < limit and all(r[n] == first[n] for r in rows):
        n += 1
    return max(0, n)


class TransformersChatBackend:
    def __init__(self, cfg: TransformersBackend, model=None, tokenizer=None):
        self.cfg = cfg
        if model is None:
            model, tokenizer = load_model(cfg.model, cfg.dtype, cfg.device, cfg.trust_remote_code)
        self.model, self.tok = model, tokenizer
        self.name = f"transformers:{cfg.model}"
        self._head = ((), None)  # (token ids, batch-1 cache) of the last shared head encoded

    @property
    def shares_prompt_head(self) -> bool:
        """True: rows of one call that start alike are cheaper (their shared head is encoded once)."""
        return self.cfg.prefix_cache

    def render(self, conv: Conversation, prefill: Optional[str]) -> str:
        text = self.tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        return text + (prefill or "")

    def generate(self, conversations: Sequence[Conversation], n: int, sampling: Sampling,
                 prefill=None, progress: bool = True, stop: Optional[Sequence[str]] = None) -> List[List[str]]:
        import torch
        from tqdm.auto import tqdm

        texts = [self.render(c, pf) for c, pf in zip(conversations, prefills(prefill, len(conversations)))]
        ids = [self.tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        head = shared_prefix_len(ids) if self.cfg.prefix_cache else 0
        if head < self.cfg.prefix_cache_min_tokens:
            head = 0
        head_cache = self._head_cache(ids[0][:head]) if head else None
        out: List[List[str]] = []
        bs = self.cfg.batch_size
        bar = tqdm(total=len(texts), desc=f"generate x{n}", unit="prompt", disable=not progress, leave=False)
        for start in range(0, len(texts), bs):
            rows = [r for r in ids[start:start + bs] for _ in range(n)]  # n copies per prompt, grouped by prompt
            input_ids, mask = self._layout(rows, head)
            # room for the tails (the first step encodes them) and every new token: no reallocation while decoding
            reserve = input_ids.shape[1] - head + sampling.max_new_tokens if self.cfg.reserved_kv else None
            cache = rows_cache(self.model, head_cache, len(rows), reserve)
            torch.manual_seed(sampling.seed + start)  # seed per batch: reproducible for the same call
            sample = sampling.temperature > 0
            with torch.inference_mode():
                gen = self.model.generate(
                    input_ids=input_ids, attention_mask=mask, **{cache_kw(self.model): cache},
                    do_sample=sample,
                    temperature=sampling.temperature if sample else None,
                    top_p=sampling.top_p if sample else None,
                    top_k=None,
                    max_new_tokens=sampling.max_new_tokens,
                    repetition_penalty=sampling.repetition_penalty if sampling.repetition_penalty != 1.0 else None,
                    pad_token_id=self.tok.pad_token_id,
                    stop_strings=list(stop) if stop else None,
                    tokenizer=self.tok if stop else None,
                )
            new = gen[:, input_ids.shape[1]:]  # (prompts in batch * n, new_tokens), grouped by prompt
            decoded = [cut_at_stop(t, stop) for t in self.tok.batch_decode(new, skip_special_tokens=True)]
            out.extend(decoded[i * n:(i + 1) * n] for i in range(len(rows) // n))
            bar.update(len(rows) // n)
        bar.close()
        return out

    def _head_cache(self, head_ids: List[int]):
        if self._head[0] != tuple(head_ids):
            self._head = (tuple(head_ids), self._encode_head(head_ids))
        return self._head[1]

    def _encode_head(self, head_ids: List[int]):
        """Key/value cache of the shared head, batch 1; each batch copies it into its rows (rows_cache)."""
        import torch
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        with torch.inference_mode():
            self.model(input_ids=torch.tensor([head_ids], device=self.model.device), use_cache=True,
                       **{cache_kw(self.model): cache})
        return cache

    def _layout(self, rows: List[List[int]], head: int):
        """[head][padding][tail] per row (head = 0 gives plain left padding), with the matching attention mask."""
        import torch

        width = max(len(r) for r in rows)
        pad = self.tok.pad_token_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            tail = r[head:]
            input_ids[i, :head] = torch.tensor(r[:head], dtype=torch.long)
            input_ids[i, width - len(tail):] = torch.tensor(tail, dtype=torch.long)
            mask[i, :head] = 1
            mask[i, width - len(tail):] = 1
        return input_ids.to(self.model.device), mask.to(self.model.device)

    def close(self) -> None:
        pass
