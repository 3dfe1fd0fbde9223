"""Stage spec_chunks@<category>: write spec(category) = overview + category policy + its style guidelines."""
from __future__ import annotations

import logging

from . import catalog
from .io import write_text
from .params import Params
from .spec import load_spec

log = logging.getLogger("spec_chunks")


def main(params: Params, category: str) -> None:
    spec = load_spec(params.paths.spec, params.categories)  # validates the whole spec, not just this category
    text = spec.chunk(category)
    write_text(catalog.spec_chunk(category), text)
    log.info("spec(%s): %d words, %d policies -> %s", category, len(text.split()),
             len(spec.categories[category].policies), catalog.spec_chunk(category))
