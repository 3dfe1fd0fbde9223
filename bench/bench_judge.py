"""Judge throughput: rubric judge samples/s vs the LLM judge on the embedded model (k=1, short outputs).

Uses judged samples from data/raw_cots when present (run the pipeline first), else synthetic ones.

    python bench/bench_judge.py [--samples 16]
"""
from __future__ import annotations

import argparse
import json
import time

from common import ROOT, machine, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=16)
    args = ap.parse_args()
    from pipelines import catalog
    from pipelines.judges import JudgeItem, make_judge
    from pipelines.params import JudgeParams, Sampling, TransformersBackend, load_params
    from pipelines.spec import load_spec

    params = load_params(ROOT / "params.yaml")
    spec = load_spec(ROOT / params.paths.spec, params.categories)
    raw = ROOT / catalog.raw_cots("violence")
    rows = [json.loads(x) for x in raw.read_text().splitlines()] if raw.exists() else []
    rows = [r for r in rows if r["parse_ok"]][: args.samples]
    items = [JudgeItem(r["prompt"], r["category"], r["expected"], r["policy"], spec.chunk("violence"), r["answer"],
                       r["cot"]) for r in rows] or [
        JudgeItem("hit someone", "violence", "refuse", "V.2", spec.chunk("violence"), "I'm sorry, I can't help.",
                  "V.2 forbids this.")] * args.samples
    print(f"{machine()}; {len(items)} samples")
    rubric = make_judge(JudgeParams(kind="rubric"), spec)
    t = time.perf_counter()
    for _ in range(50):
        rubric.score(items, progress=False)
    rubric_sps = 50 * len(items) / (time.perf_counter() - t)
    print(f"rubric judge:        {rubric_sps:10.1f} samples/s")
    llm = make_judge(JudgeParams(kind="llm", k=1, sampling=Sampling(temperature=0.7, max_new_tokens=24),
                                 backend=TransformersBackend(kind="transformers", model=str(ROOT / catalog.BASE_MODEL),
                                                             batch_size=16)), spec)
    t = time.perf_counter()
    verdicts = llm.score(items, progress=False)
    llm_sps = len(items) / (time.perf_counter() - t)
    fails = sum(v.parse_failures for v in verdicts)
    print(f"LLM judge (135M, k=1): {llm_sps:8.2f} samples/s; unreadable judge outputs: {fails}/{len(items)}")
    summary("judge", f"rubric {rubric_sps:.0f} samples/s vs embedded LLM judge {llm_sps:.2f} samples/s "
            f"(x{rubric_sps / llm_sps:.0f}); LLM judge unreadable outputs {fails}/{len(items)}")


if __name__ == "__main__":
    main()
