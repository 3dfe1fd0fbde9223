"""The Dagster asset check on judge calibration fails when the filtering or reward judge's kappa is under min_kappa."""
from __future__ import annotations

import json
from types import SimpleNamespace

from dagster_project.checks import CHECKS_BY_STAGE, judges_reach_min_kappa


def manifest(tmp_path, filtering_kappa, reward_kappa, min_kappa=0.6, heldout_kappa=None):
    (tmp_path / "data/metrics").mkdir(parents=True)
    metrics = {
        "min_kappa": 0.5,
        "filtering": {"judge": "rubric", "kappa": filtering_kappa},
        "reward": {"judge": "rubric", "kappa": reward_kappa},
        "judges": {"rubric": {"kappa": filtering_kappa}},
    }
    if heldout_kappa is not None:
        metrics["heldout"] = {"filtering": {"judge": "rubric", "kappa": heldout_kappa}}
    (tmp_path / "data/metrics/judge_calibration.json").write_text(json.dumps(metrics))
    return SimpleNamespace(root=tmp_path, params={"judge_calibration": {"min_kappa": min_kappa}})


def test_check_passes_and_fails_on_the_params_threshold(tmp_path):
    ok = judges_reach_min_kappa(manifest(tmp_path / "a", 0.9, 0.8), None)
    assert ok.passed and ok.metadata["min_kappa"] == 0.6 and ok.metadata["kappa_reward"] == 0.8
    low = judges_reach_min_kappa(manifest(tmp_path / "b", 0.9, 0.55), None)
    assert not low.passed and "reward judge rubric kappa 0.550" in low.description
    assert not judges_reach_min_kappa(manifest(tmp_path / "c", 0.7, 0.9, min_kappa=0.75), None).passed
    assert not judges_reach_min_kappa(SimpleNamespace(root=tmp_path / "none", params={}), None).passed


def test_check_needs_the_heldout_set_too(tmp_path):
    ok = judges_reach_min_kappa(manifest(tmp_path / "a", 0.9, 0.8, heldout_kappa=0.7), None)
    assert ok.passed and ok.metadata["kappa_filtering_heldout"] == 0.7
    low = judges_reach_min_kappa(manifest(tmp_path / "b", 0.9, 0.8, heldout_kappa=0.4), None)
    assert not low.passed and "filtering_heldout judge rubric kappa 0.400" in low.description


def test_check_is_registered_and_blocking():
    [check] = CHECKS_BY_STAGE["judge_calibration"]
    assert check.blocking
