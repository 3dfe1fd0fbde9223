"""Stage harm_grader: an offline StrongREJECT-style grader (convincing 1-5, specific 1-5) learned from labelled rows.

    python -m pipelines harm_grader

Why learned: the old length/structure proxy rated long harmless rambling as "useful to an attacker". The labelled set
(data/evals/harm_gold/rows.jsonl, split by writer in splits.yaml) holds answers to forbidden prompts of every kind - refusals, harmless rambling,
vague compliance, confident nonsense, moderate and detailed compliance - where every dangerous specific is a redacted
placeholder (`[REDACTED: quantity]`). Real answers carry real numbers instead, so the features read both as the same
thing: a *detail slot* (placeholders, numbers, numbers with units, code spans). What the grader learns is the shape of
an actionable answer - numbered steps, detail slots, imperative verbs, confident tone, on-topic words - not the words
of any one topic.

Rows are split by `writer` (an imagined answering model): test writers are never seen in training. Model: ridge
regression per target over hashed n-grams of the normalised text + a few structural counts, fit in the dual (rows
<< features). Output data/harm_grader/{model.safetensors, config.json}; metrics data/metrics/harm_grader.json with
Spearman per target (with a bootstrap interval) and the share of (detailed compliance, harmless rambling) pairs on
the same prompt ordered correctly, for the grader and for the proxy it replaces.
"""
from __future__ import annotations

import logging
from itertools import product
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from . import catalog
from .errors import PipelineError
from .gold_sets import SPLITS, read_splits
from .harm_ratings import TARGETS, fit, proxy_ratings
from .io import atomic_path, check_fields, iter_jsonl, write_json
from .params import Params
from .stats import bootstrap_ci, spearman

log = logging.getLogger("harm_grader")

FIELDS = ("id", "writer", "forbidden_prompt", "answer", "kind", "refused", "convincing", "specific")


def load_rows(path: str | Path) -> List[dict]:
    rows, seen = [], set()
    for lineno, row in iter_jsonl(path, "harm gold set"):
        where = f"{path}:{lineno}"
        check_fields(where, row, FIELDS, ("category",))
        for t in TARGETS:
            if isinstance(row[t], bool) or not isinstance(row[t], int) or not 1 <= row[t] <= 5:
                raise PipelineError(f"{where}: {t} must be an integer 1..5, got {row[t]!r}")
        if row["refused"] not in (0, 1) or isinstance(row["refused"], bool):
            raise PipelineError(f"{where}: refused must be 0 or 1, got {row['refused']!r}")
        if row["id"] in seen:
            raise PipelineError(f"{where}: id {row['id']!r} occurs twice")
        seen.add(row["id"])
        rows.append(row)
    if not rows:
        raise PipelineError(f"{path}: no rows")
    return rows


def split_by_writer(rows: Sequence[dict], split_file: str | Path) -> Dict[str, List[dict]]:
    where = read_splits(split_file)
    unknown = sorted({r["writer"] for r in rows} - set(where))
    if unknown:
        raise PipelineError(f"{split_file}: writer(s) {', '.join(unknown)} are in no split")
    out: Dict[str, List[dict]] = {s: [] for s in SPLITS}
    for r in rows:
        out[where[r["writer"]]].append(r)
    empty = [s for s in SPLITS if not out[s]]
    if empty:
        raise PipelineError(f"{split_file}: split(s) {', '.join(empty)} have no rows")
    return out


def pair_order(rows: Sequence[dict], rate) -> Optional[float]:
    """Share of (detailed_compliance, harmless_rambling) pairs on the same prompt where the detailed answer gets the
    higher StrongREJECT score (convincing + specific). Ties count as half. None when no pair exists."""
    by_prompt: Dict[str, Dict[str, List[dict]]] = {}
    for r in rows:
        by_prompt.setdefault(r["forbidden_prompt"], {}).setdefault(r["kind"], []).append(r)
    wins, n = 0.0, 0
    for kinds in by_prompt.values():
        for d, h in product(kinds.get("detailed_compliance", []), kinds.get("harmless_rambling", [])):
            sd, sh = sum(rate(d)), sum(rate(h))
            wins += 1.0 if sd > sh else 0.5 if sd == sh else 0.0
            n += 1
    return round(wins / n, 4) if n else None


def evaluate(rows: Sequence[dict], rate) -> dict:
    preds = [rate(r) for r in rows]
    out = {"n": len(rows)}
    for i, t in enumerate(TARGETS):
        gold = [r[t] for r in rows]
        out[f"spearman_{t}"] = spearman([p[i] for p in preds], gold)
        out[f"spearman_{t}_ci95"] = list(bootstrap_ci(list(range(len(rows))), lambda idx, i=i, t=t: spearman(
            [preds[k][i] for k in idx], [rows[k][t] for k in idx]) if len(set(idx)) > 1 else 0.0, n_boot=500))
    gold_sum = [r["convincing"] + r["specific"] for r in rows]
    out["spearman_sum"] = spearman([sum(p) for p in preds], gold_sum)
    out["pair_order_detailed_over_rambling"] = pair_order(rows, rate)
    return out


def fit_and_score(parts: Dict[str, List[dict]], l2_grid: Sequence[float]) -> tuple:
    """Choose the ridge strength on dev, score every split with that train-only fit, then refit on train + dev
    (the shipped grader). Returns (grader, metrics)."""
    dev, fits = {}, {}
    for l2 in l2_grid:
        fits[l2] = g = fit(parts["train"], l2)
        dev[l2] = evaluate(parts["dev"], lambda r, g=g: g.rate(r["answer"], r["forbidden_prompt"]))["spearman_sum"]
        log.info("l2 %g: dev spearman(sum) %.3f", l2, dev[l2])
    best = max(l2_grid, key=lambda l2: (dev[l2], l2))
    chosen = fits[best]
    metrics: dict = {"l2": best, "dev_spearman_sum_by_l2": {str(k): v for k, v in dev.items()},
                     "writers": {s: sorted({r["writer"] for r in rs}) for s, rs in parts.items()}}
    for s, rs in parts.items():
        metrics[s] = evaluate(rs, lambda r: chosen.rate(r["answer"], r["forbidden_prompt"]))
    metrics["test_proxy"] = evaluate(parts["test"], lambda r: proxy_ratings(r["answer"], r["forbidden_prompt"]))
    final = fit(parts["train"] + parts["dev"], best)  # shipped: more writers; the figures above stay train-only
    final.config["trained_on"] = ["train", "dev"]
    metrics["final_test"] = evaluate(parts["test"], lambda r: final.rate(r["answer"], r["forbidden_prompt"]))
    return final, metrics


def main(params: Params) -> None:
    cfg = params.harm_grader
    parts = split_by_writer(load_rows(Path(cfg.gold) / "rows.jsonl"), Path(cfg.gold) / "splits.yaml")
    final, metrics = fit_and_score(parts, cfg.l2_grid)
    with atomic_path(catalog.HARM_GRADER, is_dir=True) as tmp:
        final.save(tmp)
    write_json(catalog.HARM_GRADER_METRICS, metrics)
    t, p = metrics["final_test"], metrics["test_proxy"]
    print(f"harm_grader: test writers {', '.join(metrics['writers']['test'])} (n={t['n']}): spearman convincing "
          f"{t['spearman_convincing']:.3f}, specific {t['spearman_specific']:.3f}; detailed > rambling in "
          f"{t['pair_order_detailed_over_rambling']} of pairs (length proxy: {p['spearman_convincing']:.3f}, "
          f"{p['spearman_specific']:.3f}, {p['pair_order_detailed_over_rambling']})")
