"""Stage sft_dataset: kept samples of all categories as spec-free chat examples (prompt -> CoT + answer).

The system prompt is the fixed spec-free one from params (also used by RL and evaluation): the model must learn to
recall the spec, so no spec text may reach the prompt side. A check enforces that.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from typing import Dict, List

from . import catalog
from .cot import join_cot
from .errors import PipelineError
from .io import read_jsonl, read_text, write_json, write_jsonl
from .params import Params

log = logging.getLogger("sft_dataset")


def spec_lines(chunks: List[str], min_len: int = 25) -> List[str]:
    """Distinctive lines of the spec chunks, used to detect spec text leaking into prompts."""
    return sorted({ln.strip() for c in chunks for ln in c.splitlines() if len(ln.strip()) >= min_len})


def build_examples(judged: Dict[str, List[dict]], system_prompt: str, max_per_prompt: int) -> List[dict]:
    """Pure core: pick the best kept samples per prompt and turn them into chat examples, in a fixed order."""
    examples = []
    for category, rows in judged.items():  # dict order = params.yaml category order
        by_prompt: Dict[str, List[dict]] = defaultdict(list)
        for r in rows:
            if r["kept"]:
                by_prompt[r["prompt_id"]].append(r)
        for prompt_id in sorted(by_prompt):
            best = sorted(by_prompt[prompt_id], key=lambda r: (-r["score"], r["sample_index"]))[:max_per_prompt]
            for r in best:
                examples.append({
                    "id": r["id"], "category": category, "prompt_id": prompt_id, "expected": r["expected"],
                    "policy": r.get("policy"), "score": r["score"],
                    "messages": [
                        {"role": "system", "content": system_prompt},
                        {"role": "user", "content": r["prompt"]},
                        {"role": "assistant", "content": join_cot(r["cot"], r["answer"])},
                    ],
                })
    return examples


def assert_spec_free(examples: List[dict], spec_text_lines: List[str]) -> None:
    for ex in examples:
        prompt_side = "\n".join(m["content"] for m in ex["messages"] if m["role"] != "assistant")
        leaked = next((ln for ln in spec_text_lines if ln in prompt_side), None)
        if leaked:
            raise PipelineError(f"sft_dataset: spec text leaked into the prompt of {ex['id']}: {leaked[:60]!r}")


def main(params: Params) -> None:
    judged = {c: read_jsonl(catalog.judged_cots(c)) for c in params.categories}
    examples = build_examples(judged, params.sft_dataset.system_prompt, params.sft_dataset.max_per_prompt)
    assert_spec_free(examples, spec_lines([read_text(catalog.spec_chunk(c)) for c in params.categories]))
    per_cat = {}
    for c, rows in judged.items():
        per_cat[c] = {"samples": len(rows), "kept": sum(r["kept"] for r in rows),
                      "examples": sum(e["category"] == c for e in examples)}
    metrics = {"examples": len(examples), "per_category": per_cat}
    write_jsonl(catalog.SFT_TRAIN, examples)
    write_json(catalog.SFT_DATASET_METRICS, metrics)
    width = max(map(len, per_cat))
    lines = [f"{'category':<{width}}  samples  kept  examples"] + [
        f"{c:<{width}}  {v['samples']:>7}  {v['kept']:>4}  {v['examples']:>8}" for c, v in per_cat.items()]
    print("\n".join(lines) + f"\ntotal examples: {len(examples)}")
    if not examples:
        log.warning("sft_dataset: no sample passed the judge; SFT needs at least one (lower judged_cots.judge.threshold?)")
