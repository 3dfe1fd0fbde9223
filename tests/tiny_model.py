"""A tiny random-weight Llama with a ChatML tokenizer, built in-process (no download), for fast CPU tests.

One implementation serves tests, benchmarks and smoke runs: `pipelines.training_common.build_tiny_checkpoint`.
"""
from __future__ import annotations

from pathlib import Path

from pipelines.training_common import build_tiny_checkpoint


def make_tiny_model(out: str | Path, layers: int = 2, hidden: int = 64, seed: int = 0) -> Path:
    return build_tiny_checkpoint(out, seed=seed, hidden=hidden, layers=layers)
