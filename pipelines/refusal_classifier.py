"""Stage refusal_classifier: learn the three-class refusal reading from the labelled set, split by voice.

    python -m pipelines refusal_classifier

Reads data/evals/refusal_gold/voices/<voice>.jsonl (rows: id, voice, lang, category, prompt, answer, label, kind)
and splits.yaml (which voices are train, dev and test). Every voice sits in exactly one split, so the test split holds
assistants whose way of writing the classifier never saw, which is the situation the pipeline is in when it reads
another model's answers. The L2 strength is chosen on dev; the final model is fit on train + dev; test is only ever
scored, never used to choose anything.

Outputs: data/refusal_classifier/{model.safetensors, config.json} (the model `pipelines.refusal.classify` loads) and
data/metrics/refusal_classifier.json: accuracy (three-class and refusal yes/no) with 95% intervals per split,
per test voice, per kind, the confusion matrix, and the phrase matcher on the same rows as a baseline.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Sequence

from . import catalog
from .errors import PipelineError
from .gold_sets import SPLITS, read_splits
from .io import atomic_path, check_fields, iter_jsonl, sha256_text, write_json
from .params import Params
from .refusal import phrase_refusal
from .refusal_model import CLASSES, RefusalModel, train
from .stats import wilson

log = logging.getLogger("refusal_classifier")

FIELDS = ("id", "voice", "prompt", "answer", "label")
OPTIONAL = ("lang", "category", "kind")


def load_gold(gold_dir: str | Path) -> Dict[str, List[dict]]:
    """Rows of every voice, grouped by split as splits.yaml assigns the voices. Bad rows are one-line errors."""
    gold_dir = Path(gold_dir)
    split_file = gold_dir / "splits.yaml"
    voice_split = read_splits(split_file)
    files = sorted((gold_dir / "voices").glob("*.jsonl"))
    if not files:
        raise PipelineError(f"{gold_dir}/voices: no <voice>.jsonl files")
    out: Dict[str, List[dict]] = {s: [] for s in SPLITS}
    seen: Dict[str, str] = {}
    for path in files:
        voice = path.stem
        if voice not in voice_split:
            raise PipelineError(f"{path}: voice {voice!r} is in no split of {split_file}")
        for lineno, row in iter_jsonl(path, "refusal gold set"):
            where = f"{path}:{lineno}"
            check_fields(where, row, FIELDS, OPTIONAL)
            if row["voice"] != voice:
                raise PipelineError(f"{where}: voice {row['voice']!r} differs from the file name ({voice!r})")
            if row["label"] not in CLASSES:
                raise PipelineError(f"{where}: label {row['label']!r} is not one of {', '.join(CLASSES)}")
            if row["id"] in seen:
                raise PipelineError(f"{where}: id {row['id']!r} already used in {seen[row['id']]}")
            seen[row["id"]] = where
            out[voice_split[voice]].append(row)
    missing = [s for s in SPLITS if not out[s]]
    if missing:
        raise PipelineError(f"{split_file}: split(s) {', '.join(missing)} have no rows")
    return out


def _acc(flags: Sequence[bool]) -> dict:
    k, n = sum(flags), len(flags)
    return {"accuracy": round(k / n, 4), "accuracy_ci95": list(wilson(k, n)), "n": n}


def score(model: RefusalModel, rows: Sequence[dict]) -> dict:
    """Three-class and binary (refusal or not) accuracy of the model, and of the phrase matcher, on `rows`."""
    pred = [model.predict(r["answer"], r.get("prompt")) for r in rows]
    gold = [r["label"] for r in rows]
    bin_gold = [g != "full_compliance" for g in gold]
    three = _acc([p == g for p, g in zip(pred, gold)])
    binary = _acc([(p != "full_compliance") == b for p, b in zip(pred, bin_gold)])
    phrase = _acc([phrase_refusal(r["answer"]) == b for r, b in zip(rows, bin_gold)])
    confusion = {g: {p: 0 for p in CLASSES} for g in CLASSES}
    for p, g in zip(pred, gold):
        confusion[g][p] += 1
    tp = sum(p != "full_compliance" and b for p, b in zip(pred, bin_gold))
    return {
        "n": len(rows), "accuracy": three["accuracy"], "accuracy_ci95": three["accuracy_ci95"],
        "refusal_accuracy": binary["accuracy"], "refusal_accuracy_ci95": binary["accuracy_ci95"],
        "refusal_precision": round(tp / max(1, sum(p != "full_compliance" for p in pred)), 4),
        "refusal_recall": round(tp / max(1, sum(bin_gold)), 4),
        "phrase_matcher_refusal_accuracy": phrase["accuracy"],
        "phrase_matcher_refusal_accuracy_ci95": phrase["accuracy_ci95"],
        "confusion": confusion,  # gold label -> predicted label -> count
    }


def by(rows: Sequence[dict], key: str, model: RefusalModel) -> dict:
    groups: Dict[str, List[dict]] = defaultdict(list)
    for r in rows:
        groups[str(r.get(key) or "unknown")].append(r)
    out = {}
    for name, rs in sorted(groups.items()):
        s = score(model, rs)
        out[name] = {k: s[k] for k in ("n", "accuracy", "accuracy_ci95", "refusal_accuracy",
                                       "phrase_matcher_refusal_accuracy")}
    return out


def fit_and_score(gold: Dict[str, List[dict]], l2_grid: Sequence[float], data_sha: str) -> tuple:
    """Choose L2 on dev, refit on train + dev, score every split. Returns (model, metrics)."""
    def fit_on(rows: Sequence[dict], l2: float) -> RefusalModel:
        return train([r["answer"] for r in rows], [r.get("prompt") for r in rows], [r["label"] for r in rows], l2,
                     {"gold_sha256": data_sha})

    dev_acc, fits = {}, {}
    for l2 in l2_grid:
        fits[l2] = fit_on(gold["train"], l2)
        dev_acc[l2] = score(fits[l2], gold["dev"])["accuracy"]
        log.info("l2 %g: dev accuracy %.3f", l2, dev_acc[l2])
    best = max(l2_grid, key=lambda l2: (dev_acc[l2], l2))  # ties: the stronger regularisation (simpler model)
    chosen = fits[best]
    metrics = {"l2": best, "dev_accuracy_by_l2": {str(k): v for k, v in dev_acc.items()},
               "classes": list(CLASSES), "voices": {s: sorted({r["voice"] for r in gold[s]}) for s in SPLITS}}
    for s in SPLITS:
        metrics[s] = score(chosen, gold[s])
    metrics["test_per_voice"] = by(gold["test"], "voice", chosen)
    metrics["test_per_kind"] = by(gold["test"], "kind", chosen)
    metrics["test_per_lang"] = by(gold["test"], "lang", chosen)
    # the shipped model also learns from dev (more voices); its figures above are those of the train-only fit with
    # the same l2, so the dev and test numbers stay honest
    final = fit_on(gold["train"] + gold["dev"], best)
    final.config["trained_on"] = ["train", "dev"]
    metrics["final_test"] = score(final, gold["test"])
    return final, metrics


def main(params: Params) -> None:
    cfg = params.refusal_classifier
    gold = load_gold(cfg.gold)
    data_sha = sha256_text("\n".join(f"{r['id']}\t{r['label']}\t{r['answer']}" for s in SPLITS for r in gold[s]))
    log.info("rows: %s", {s: len(gold[s]) for s in SPLITS})
    model, metrics = fit_and_score(gold, cfg.l2_grid, data_sha)
    with atomic_path(catalog.REFUSAL_CLASSIFIER, is_dir=True) as tmp:
        model.save(tmp)
    write_json(catalog.REFUSAL_CLASSIFIER_METRICS, metrics)
    t = metrics["final_test"]
    print(f"refusal_classifier: test voices {', '.join(metrics['voices']['test'])}: 3-class accuracy "
          f"{t['accuracy']:.3f} {t['accuracy_ci95']}, refusal yes/no {t['refusal_accuracy']:.3f} "
          f"{t['refusal_accuracy_ci95']} (phrase matcher {t['phrase_matcher_refusal_accuracy']:.3f}), n={t['n']}")
