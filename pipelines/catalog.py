"""Where every stage writes: each DVC out, metrics file and plots path of dvc.yaml, defined once.

This mirrors dvc.yaml (tests/test_catalog.py holds the two equal, stage by stage, with the foreach keys expanded from
params.yaml). Stages read their inputs and write their outputs through these names instead of spelling a path or
importing another stage to learn one; the asset checks, cards and benches use them too. Paths are relative to the
project root, where DVC runs every stage. Only pathlib here: the Dagster adapter and the benches import it as well.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

DATA = Path("data")
METRICS = DATA / "metrics"
DVCLIVE = DATA / "dvclive"

# ---------------------------------------------------------------------------- models
BASE_MODEL = DATA / "base_model"
SFT_CHECKPOINT = DATA / "sft_checkpoint"
SFT_CHECKPOINT_METRICS = METRICS / "sft_checkpoint.json"
RL_CHECKPOINT = DATA / "rl_checkpoint"
RL_CHECKPOINT_METRICS = METRICS / "rl_checkpoint.json"
REFUSAL_CLASSIFIER = DATA / "refusal_classifier"
REFUSAL_CLASSIFIER_METRICS = METRICS / "refusal_classifier.json"
HARM_GRADER = DATA / "harm_grader"
HARM_GRADER_METRICS = METRICS / "harm_grader.json"


def dvclive(stage: str) -> Path:
    """The DVCLive directory of a training stage: metrics.json (last values) and plots/metrics/<key>.tsv (curves)."""
    return DVCLIVE / stage


def dvclive_metrics(stage: str) -> Path:
    return dvclive(stage) / "metrics.json"


def dvclive_plots(stage: str) -> Path:
    return dvclive(stage) / "plots"


# ---------------------------------------------------------------------------- data, per category
def spec_chunk(category: str) -> Path:
    return DATA / "spec_chunks" / f"{category}.md"


def raw_cots(category: str) -> Path:
    return DATA / "raw_cots" / f"{category}.jsonl"


def raw_cots_metrics(category: str) -> Path:
    return METRICS / "raw_cots" / f"{category}.json"


def judged_cots(category: str) -> Path:
    return DATA / "judged_cots" / f"{category}.jsonl"


def judged_cots_metrics(category: str) -> Path:
    return METRICS / "judged_cots" / f"{category}.json"


SFT_DATASET = DATA / "sft_dataset"  # the out is the directory; train.jsonl is its one file
SFT_TRAIN = SFT_DATASET / "train.jsonl"
SFT_DATASET_METRICS = METRICS / "sft_dataset.json"

# ---------------------------------------------------------------------------- evaluation
def eval_scores(model: str) -> Path:
    """The out of eval_scores@<model>: a directory, replaced as a whole."""
    return DATA / "eval_scores" / model


def eval_results(model: str) -> Path:
    return eval_scores(model) / "results.jsonl"


def eval_metrics(model: str) -> Path:
    return METRICS / "eval_scores" / f"{model}.json"


JUDGE_CALIBRATION = DATA / "judge_calibration"
JUDGE_CALIBRATION_METRICS = METRICS / "judge_calibration.json"

REPORT = DATA / "report"
REPORT_METRICS = METRICS / "report.json"


# The report's files for dvc.yaml's top-level `plots:`. They take the report directory so that the report can be
# built elsewhere (tests) with the same layout.
def pareto_png(report: Path = REPORT) -> Path:
    return report / "pareto.png"


def per_category_png(report: Path = REPORT) -> Path:
    return report / "per_category.png"


def pareto_data(model: str, report: Path = REPORT) -> Path:
    return report / "plots" / f"pareto_{model}.json"


def per_category_data(model: str, report: Path = REPORT) -> Path:
    return report / "plots" / f"per_category_{model}.csv"


CARDS = DATA / "cards"
DATASET_CARDS = CARDS / "datasets"


def model_card(model: str) -> Path:
    return CARDS / "models" / model


# ---------------------------------------------------------------------------- the table tests compare with dvc.yaml
def _entry(outs: Sequence[Path], metrics: Sequence[Path] = (), plots: Sequence[Path] = ()) -> Dict[str, List[str]]:
    return {"outs": [p.as_posix() for p in outs], "metrics": [p.as_posix() for p in metrics],
            "plots": [p.as_posix() for p in plots]}


def by_stage(categories: Sequence[str], models: Sequence[str]) -> Dict[str, Dict[str, List[str]]]:
    """{dvc stage item (`raw_cots@violence`): {"outs", "metrics", "plots": paths}} for the given categories and
    eval_scores.models keys: what dvc.yaml must declare. Outs exclude metrics and plots, as in dvc.yaml."""
    table = {
        "base_model": _entry([BASE_MODEL]),
        "refusal_classifier": _entry([REFUSAL_CLASSIFIER], [REFUSAL_CLASSIFIER_METRICS]),
        "harm_grader": _entry([HARM_GRADER], [HARM_GRADER_METRICS]),
        "sft_dataset": _entry([SFT_DATASET], [SFT_DATASET_METRICS]),
        "sft_checkpoint": _entry([SFT_CHECKPOINT], [SFT_CHECKPOINT_METRICS, dvclive_metrics("sft_checkpoint")],
                                 [dvclive_plots("sft_checkpoint")]),
        "rl_checkpoint": _entry([RL_CHECKPOINT], [RL_CHECKPOINT_METRICS, dvclive_metrics("rl_checkpoint")],
                                [dvclive_plots("rl_checkpoint")]),
        "judge_calibration": _entry([JUDGE_CALIBRATION], [JUDGE_CALIBRATION_METRICS]),
        "report": _entry([REPORT], [REPORT_METRICS]),
        "cards": _entry([DATASET_CARDS]),
    }
    for c in categories:
        table[f"spec_chunks@{c}"] = _entry([spec_chunk(c)])
        table[f"raw_cots@{c}"] = _entry([raw_cots(c)], [raw_cots_metrics(c)])
        table[f"judged_cots@{c}"] = _entry([judged_cots(c)], [judged_cots_metrics(c)])
    for m in models:
        table[f"eval_scores@{m}"] = _entry([eval_scores(m)], [eval_metrics(m)])
        table[f"model_cards@{m}"] = _entry([model_card(m)])
    return table


def report_plots(models: Sequence[str]) -> List[str]:
    """The report files dvc.yaml's top-level `plots:` names, for the report's models."""
    files = [pareto_png(), per_category_png()]
    files += [p for m in models for p in (pareto_data(m), per_category_data(m))]
    return [p.as_posix() for p in files]
