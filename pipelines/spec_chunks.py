"""Stage spec_chunks@<category>: write spec(category) = overview + category policy + its style guidelines."""
from __future__ import annotations

import logging
from pathlib import Path

from .io import write_text
from .params import Params
from .spec import load_spec

log = logging.getLogger("spec_chunks")


def chunk_path(category: str) -> Path:
    return Path("data/spec_chunks") / f"{category}.md"


def main(params: Params, category: str) -> None:
    spec = load_spec(params.paths.spec, params.categories)  # validates the whole spec, not just this category
    text = spec.chunk(category)
    write_text(chunk_path(category), text)
    log.info("spec(%s): %d words, %d policies -> %s", category, len(text.split()),
             len(spec.categories[category].policies), chunk_path(category))
