"""Stage judged_cots@<category>: the spec-aware judge scores every sample (k times, minimum kept) and flags keepers.

Unparseable samples are not sent to the judge: they score 0 with the parse problem as rationale.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import List

from . import catalog
from .io import read_jsonl, read_text, sha256_text, write_json, write_jsonl
from .judges import Judge, JudgeItem, Verdict, make_judge
from .params import Params
from .shards import fingerprint, run_sharded
from .spec import load_spec
from .timings import record

log = logging.getLogger("judged_cots")
SHARD = 32  # samples per resumable judge shard


def judge_records(rows: List[dict], chunk: str, judge: Judge, threshold: float) -> List[dict]:
    """Attach judge scores to sample records; returns new dicts (inputs are not modified)."""
    todo = [r for r in rows if r["parse_ok"]]
    verdicts = iter(judge.score([
        JudgeItem(prompt=r["prompt"], category=r["category"], expected=r["expected"], policy=r.get("policy"),
                  spec=chunk, answer=r["answer"], cot=r["cot"]) for r in todo], progress=False))
    out = []
    for r in rows:
        v = next(verdicts) if r["parse_ok"] else Verdict([0.0], 0.0, f"unparsed sample: {r['parse_problem']}", 0, False)
        out.append({**r, "judge": judge.name, "judge_sees_cot": judge.params.sees_cot, "judge_saw_cot": v.saw_cot,
                    "scores": v.scores, "score": v.score, "rationale": v.rationale,
                    "judge_parse_failures": v.parse_failures, "kept": v.score >= threshold})
    return out


def main(params: Params, category: str) -> None:
    t0 = time.time()
    jp = params.judged_cots.judge
    spec = load_spec(params.paths.spec, params.categories)
    chunk = read_text(catalog.spec_chunk(category), "spec chunk (run spec_chunks first)")
    rows = read_jsonl(catalog.raw_cots(category))
    judge = make_judge(jp, spec)
    fp = fingerprint(sha256_text(chunk), [r["id"] + sha256_text(r["raw"]) for r in rows], jp.model_dump())
    try:
        judged = run_sharded(Path(params.paths.work) / "judged_cots" / category, fp, rows, SHARD,
                             lambda i, shard: judge_records(shard, chunk, judge, jp.threshold),
                             desc=f"judged_cots@{category}")
    finally:
        judge.close()
    write_jsonl(catalog.judged_cots(category), judged)
    kept = sum(r["kept"] for r in judged)
    n = len(judged)
    metrics = {
        "samples": n, "kept": kept, "keep_rate": round(kept / max(1, n), 4),
        "mean_score": round(sum(r["score"] for r in judged) / max(1, n), 3),
        "unparsed_samples": sum(not r["parse_ok"] for r in judged),
        "judge_parse_failures": sum(r["judge_parse_failures"] for r in judged),
        "judge": judge.name, "threshold": jp.threshold,
    }  # no time in the metrics (a DVC out): it goes to paths.work/timings/
    write_json(catalog.judged_cots_metrics(category), metrics)
    wall = record(f"judged_cots@{category}", params.paths.work, wall_s=time.time() - t0)["wall_s"]
    log.info("judged_cots@%s: %s in %.1f s", category, metrics, wall)
