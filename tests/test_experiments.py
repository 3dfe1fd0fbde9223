"""DVC experiments over the judge threshold: two sequential `dvc exp run -S` runs in a temp repo (fake generator),
both visible in `dvc exp show --json` with their own params and metrics, only the affected stages rerun, and the
better one promoted to a git branch with `dvc exp branch`."""
from __future__ import annotations

import json

import pytest
import yaml

from dvc_repo import CATEGORIES, ran_stages, reproduced_spine, sh

pytestmark = pytest.mark.slow
KEY = "judged_cots.judge.threshold"


def experiments(show: list, baseline: str) -> dict:
    """{experiment name: its `data` (params, metrics)} under one baseline commit of `dvc exp show --json`."""
    base = next(b for b in show if b["rev"] == baseline)
    return {e["name"]: e["revs"][0]["data"] for e in base.get("experiments") or []}


def judged_metrics(data: dict, category: str) -> dict:
    return data["metrics"][f"data/metrics/judged_cots/{category}.json"]["data"]


def test_threshold_sweep_shows_two_experiments_and_promotes_one(tmp_path):
    repo = reproduced_spine(tmp_path / "repo")
    head = sh("git rev-parse HEAD", repo).stdout.strip()
    allowed = {f"judged_cots@{c}" for c in CATEGORIES} | {"sft_dataset"}
    for t in (5, 9):
        run = sh(f"dvc exp run -S {KEY}={t} -n thr{t}", repo)
        # Only the judge and what follows it rerun; generation and the base model come from the cache.
        assert ran_stages(run.stdout) and ran_stages(run.stdout) <= allowed, run.stdout

    exps = experiments(json.loads(sh("dvc exp show --json", repo).stdout), head)
    assert {"thr5", "thr9"} <= set(exps), sorted(exps)
    for name, t in (("thr5", 5), ("thr9", 9)):
        assert exps[name]["params"]["params.yaml"]["data"]["judged_cots"]["judge"]["threshold"] == t
        for c in CATEGORIES:  # each experiment's metrics were written by a run at its own threshold
            assert judged_metrics(exps[name], c)["threshold"] == t
    assert exps["thr5"]["metrics"] != exps["thr9"]["metrics"]
    for c in CATEGORIES:  # a stricter threshold can only keep fewer samples of the same generations
        assert judged_metrics(exps["thr5"], c)["kept"] >= judged_metrics(exps["thr9"], c)["kept"]
    kept = {n: sum(judged_metrics(exps[n], c)["kept"] for c in CATEGORIES) for n in ("thr5", "thr9")}
    # The fake generator's samples score across the 0..10 range, so the two thresholds must select differently.
    assert kept["thr5"] > kept["thr9"], kept

    # Promote the experiment that keeps more data: a normal git branch with its params, dvc.lock and metrics.
    sh("dvc exp branch thr5 low-threshold", repo)
    params = yaml.safe_load(sh("git show low-threshold:params.yaml", repo).stdout)
    assert params["judged_cots"]["judge"]["threshold"] == 5
    lock = yaml.safe_load(sh("git show low-threshold:dvc.lock", repo).stdout)
    for c in CATEGORIES:
        assert lock["stages"][f"judged_cots@{c}"]["params"]["params.yaml"]["judged_cots.judge"]["threshold"] == 5
    diff = json.loads(sh("dvc metrics diff main low-threshold --json", repo).stdout)
    assert diff[f"data/metrics/judged_cots/{CATEGORIES[0]}.json"]["threshold"]["new"] == 5
