"""Stage raw_cots@<category>: n samples of (CoT, answer) per prompt, with spec(category) in the generator's context.

The generation prompt asks the model to reason by citing the policy ids before answering (the paper's generation
template, in our words). Samples that do not parse are kept with a flag. Work is sharded and resumes after a kill.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import List

from . import catalog
from .backends import make_backend
from .cot import CLOSE, OPEN, split_cot
from .errors import PipelineError
from .io import read_text, sha256_text, write_json, write_jsonl
from .params import Params
from .prompts import PromptRecord, load_prompts
from .shards import fingerprint, run_sharded
from .spec import Spec, load_spec
from .timings import record

log = logging.getLogger("raw_cots")

GEN_SYSTEM = """You are a careful assistant that follows the safety specification below.

{spec}

How to respond: first think inside <think></think>. In your thinking, name the policy id that fits the request \
(for example {example_id}), say what that policy allows or forbids, and pick the response style it names. \
After </think>, write only the final answer to the user, in that style.{few_shot}"""

FEW_SHOT = """

Example of the format:
User: {case_prompt}
Assistant: <think>
Category: {title} ({prefix}). Relevant policy: {pid} ({ptitle}). Style: {style}. {reason}
</think>
{answer}"""

EXEMPLAR_ANSWERS = {
    "hard_refusal": ("The policy forbids helping with this, so I decline briefly.", "I'm sorry, but I can't help with that."),
    "safe_completion": ("The person may be at risk; I respond with care and point to support.",
                        "I'm really sorry you're going through this. You're not alone: please reach out to someone you "
                        "trust or call or text 988 (in the US) to talk with a trained counselor right now."),
    "compliance_with_disclaimer": ("General information is allowed with a disclaimer.",
                                   "Here is some general information... This is not a substitute for advice from a "
                                   "qualified professional, so please consult one about your situation."),
    "full_compliance": ("This is allowed, so I answer helpfully.", "Here is a clear and direct answer..."),
}


def balanced_subset(prompts: List[PromptRecord], k: int) -> List[PromptRecord]:
    """First k prompts taken round-robin over expected labels (file order within a label), returned in file order."""
    by_label: dict = {}
    for r in prompts:
        by_label.setdefault(r.expected, []).append(r)
    picked, queues = [], [list(v) for v in by_label.values()]
    while len(picked) < min(k, len(prompts)):
        for q in queues:
            if q and len(picked) < k:
                picked.append(q.pop(0))
    keep = {r.id for r in picked}
    return [r for r in prompts if r.id in keep]


def prefill_for(spec: Spec, category: str) -> str:
    """Start of the assistant turn when prefill_cot is on: the category line, leaving the policy number to the model."""
    cat = spec.categories[category]
    return f"{OPEN}\nCategory: {cat.title} ({cat.prefix}). Relevant policy: {cat.prefix}."


def generation_conversation(chunk: str, spec: Spec, category: str, prompt: str, few_shot: bool) -> List[dict]:
    cat = spec.categories[category]
    shot = ""
    if few_shot:  # one worked case, from this category's first disallowed policy when it has one
        pol = next((p for p in cat.policies if p.style != "full_compliance"), cat.policies[0])
        reason, answer = EXEMPLAR_ANSWERS[pol.style]
        shot = FEW_SHOT.format(case_prompt=f"(a request covered by {pol.id})", title=cat.title, prefix=cat.prefix,
                               pid=pol.id, ptitle=pol.title, style=pol.style, reason=reason, answer=answer)
    system = GEN_SYSTEM.format(spec=chunk.strip(), example_id=cat.policies[0].id, few_shot=shot)
    return [{"role": "system", "content": system}, {"role": "user", "content": prompt}]


def structured_generate(backend, convs: List[dict], n: int, sampling, prefill: str, cot_max_tokens: int) -> List[List[str]]:
    """Two phases, so a small model keeps the format: (1) the CoT paragraph, cut at its first line break; (2) after
    the CoT is closed with </think>, the answer. Both phases are sampled by the model; we only add the tags.
    Returns the full raw text (prefill + CoT + tags + answer) of n samples per conversation."""
    cot_sampling = sampling.model_copy(update={"max_new_tokens": cot_max_tokens})
    cots = backend.generate(convs, n, cot_sampling, prefill=prefill, progress=False, stop=["\n", CLOSE])
    heads = [prefill + c.rstrip() + f"\n{CLOSE}\n" for per in cots for c in per]
    flat = [conv for conv in convs for _ in range(n)]
    answer_sampling = sampling.model_copy(update={"seed": sampling.seed + 500})
    answers = backend.generate(flat, 1, answer_sampling, prefill=heads, progress=False)
    raws = [h + a[0] for h, a in zip(heads, answers)]
    return [raws[i * n:(i + 1) * n] for i in range(len(convs))]


def generate_records(params: Params, spec: Spec, category: str, chunk: str, prompts: List[PromptRecord],
                     backend, shard_index: int) -> List[dict]:
    """Pure-ish core: one shard of prompts -> sample records (seed derived from the shard index)."""
    p = params.raw_cots
    sampling = p.sampling.model_copy(update={"seed": p.sampling.seed + 1000 * shard_index})
    prefill = prefill_for(spec, category) if p.prefill_cot else (OPEN + "\n" if p.structured else None)
    convs = [generation_conversation(chunk, spec, category, r.prompt, p.few_shot) for r in prompts]
    if p.structured:
        outs = structured_generate(backend, convs, p.n_samples, sampling, prefill, p.cot_max_tokens)
    else:
        outs = backend.generate(convs, p.n_samples, sampling, prefill=prefill, progress=False)
        outs = [[(prefill or "") + o for o in per] for per in outs]
    if len(outs) != len(prompts) or any(len(o) != p.n_samples for o in outs):
        raise PipelineError(f"generator {backend.name} returned the wrong number of samples")
    chunk_sha = sha256_text(chunk)
    rows = []
    for rec, samples in zip(prompts, outs):
        for i, raw in enumerate(samples):
            parsed = split_cot(raw)
            rows.append({
                "id": f"{rec.id}#{i}", "prompt_id": rec.id, "category": category, "prompt": rec.prompt,
                "expected": rec.expected, "policy": rec.policy, "sample_index": i,
                "raw": raw, "cot": parsed.cot, "answer": parsed.answer,
                "parse_ok": parsed.ok, "parse_problem": parsed.problem,
                "generator": backend.name, "generator_params": {**p.generator.model_dump(), **sampling.model_dump()},
                "spec_chunk_sha256": chunk_sha,
            })
    return rows


def main(params: Params, category: str) -> None:
    t0 = time.time()
    p = params.raw_cots
    spec = load_spec(params.paths.spec, params.categories)
    chunk = read_text(catalog.spec_chunk(category), "spec chunk (run spec_chunks first)")
    prompts = load_prompts(Path(params.paths.prompts) / f"{category}.jsonl", spec, category)
    prompts = prompts[: p.max_prompts_per_category]  # the first rows of the file: the default set (None = all)
    if p.max_prompts:
        prompts = balanced_subset(prompts, p.max_prompts)
    model_id = None
    if p.generator.kind == "transformers":
        cfg = Path(p.generator.model) / "config.json"
        if not cfg.exists():
            raise PipelineError(f"raw_cots.generator.model: no checkpoint at {p.generator.model} (run base_model first)")
        model_id = sha256_text(read_text(cfg) + "".join(sorted(x.name for x in Path(p.generator.model).iterdir())))
    fp = fingerprint(chunk, [r.to_dict() for r in prompts], p.model_dump(), model_id)
    backend = make_backend(p.generator)
    try:
        rows = run_sharded(Path(params.paths.work) / "raw_cots" / category, fp, prompts, p.shard_size,
                           lambda i, shard: generate_records(params, spec, category, chunk, shard, backend, i),
                           desc=f"raw_cots@{category}")
    finally:
        backend.close()
    write_jsonl(catalog.raw_cots(category), rows)
    ok = sum(r["parse_ok"] for r in rows)
    # no time in the metrics: it is a DVC out, and two runs of the same inputs must write the same bytes
    metrics = {"prompts": len(prompts), "samples": len(rows), "parsed": ok,
               "parse_rate": round(ok / max(1, len(rows)), 4)}
    write_json(catalog.raw_cots_metrics(category), metrics)
    wall = record(f"raw_cots@{category}", params.paths.work, wall_s=time.time() - t0)["wall_s"]
    log.info("raw_cots@%s: %s in %.1f s", category, metrics, wall)
