"""Bit-identical reruns: the tiny pipeline run in two fresh clones of one commit records the same md5 for every out.

A time, host name or absolute path written into an out makes two runs of the same code on the same inputs differ,
so DVC sees a changed out and reruns everything downstream. The stages here are every stage that needs no training
(the spine, the measurement models, evaluation of the base model, judge calibration, the report), on one category
with the fake generator and a tiny random-weight model; the training stages have their own bitwise checks
(tests/test_sft_checkpoint.py, tests/test_fault_injection.py). bench/bench_twoclone.py does the same for the whole
default pipeline (`make run`). The two clones run at once: about 40 s of CPU each, 80 s of wall time on the shared
2-core box (load 3-5). The last tests hold what `python -m dagster_project audit` says about reruns and the
environment lock.
"""
from __future__ import annotations

import copy
import json
import subprocess
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from dagster_project.audit import FAIL, PASS, SKIP, WARN, audit_lock, differing_outs, lock_out_md5s, \
    nondeterministic_settings
from dvc_repo import SPINE, build_repo, sh, tool_env

STAGES = (*SPINE, "harm_grader", "eval_scores", "judge_calibration", "report")


def tiny_params() -> dict:
    """Overrides for the smallest run that still goes through every stage above on its real code path."""
    judges = yaml.safe_load((ROOT / "params.yaml").read_text())["judge_calibration"]["judges"]
    for j in judges:
        if j.get("kind") == "llm":
            j["max_items"] = 2  # the LLM judge on the tiny model: a few rows are enough to show its output is stable
    return {
        "eval_scores.models": {"base": "data/base_model"},
        "eval_scores.sets": {"harmful": 1, "benign": 1, "jailbreak": 1, "transforms": ["base64"],
                             "transformations": 1, "multilingual": 1, "external": [], "external_max": None},
        "eval_scores.sampling.max_new_tokens": 8,
        "report.models": ["base"],
        "judge_calibration.judges": judges,
        # one strength each, the one the default grids pick: the fits take most of these two stages' time
        "refusal_classifier.l2_grid": [0.001],
        "harm_grader.l2_grid": [0.1],
    }


def keep_gold_rows_of(repo: Path, category: str) -> None:
    """The judge gold sets cut to the repo's one category (a row of a category outside params.yaml is an error)."""
    for f in (repo / "data/evals/judge_gold").glob("*.jsonl"):
        rows = [ln for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]
        f.write_text("".join(ln + "\n" for ln in rows if json.loads(ln)["category"] == category), encoding="utf-8")


def repro_both(clones) -> None:
    """`dvc repro` in every clone at once (they share nothing: each has its own DVC cache and work dir)."""
    procs = [subprocess.Popen("dvc repro", cwd=c, env=tool_env(cwd=c), shell=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for c in clones]
    for c, p in zip(clones, procs):
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, f"dvc repro failed in {c}:\n{out[-3000:]}"


@pytest.mark.slow
def test_two_fresh_clones_record_the_same_out_md5s(tmp_path):
    origin = build_repo(tmp_path / "origin", stages=STAGES, categories=("violence",), params=tiny_params(),
                        commit=False)
    keep_gold_rows_of(origin, "violence")
    sh("git add -A && git commit -qm 'tiny pipeline'", origin)
    clones = [tmp_path / "one", tmp_path / "two"]
    for c in clones:
        sh(f"git clone -q {origin} {c}", tmp_path)
    repro_both(clones)
    one, two = (lock_out_md5s(c / "dvc.lock") for c in clones)
    assert {item.split("@")[0] for item, _ in one} == set(STAGES)  # every stage ran and recorded its outs
    diff = differing_outs(one, two)
    assert not diff, f"{len(diff)} of {len(set(one) | set(two))} outs differ between two runs:\n" + "\n".join(diff)


def test_differing_outs_names_every_changed_or_missing_out():
    a = {("s", "x"): "1", ("s", "y"): "2", ("t", "z"): "3"}
    b = {("s", "x"): "1", ("s", "y"): "9"}
    assert differing_outs(a, b) == ["s: y (2 != 9)", "t: z (3 != None)"]
    assert differing_outs(a, dict(a)) == []


# ---------------------------------------------------------------------------- what audit says about it
def test_audit_names_the_settings_that_make_reruns_differ():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert [w for section in params.values() for w in nondeterministic_settings(section)] == []
    off = copy.deepcopy(params)
    off["sft_checkpoint"]["device"] = "cuda"
    off["rl_checkpoint"]["launcher"] = "accelerate"
    off["raw_cots"]["generator"] = {"kind": "openai", "base_url": "http://127.0.0.1:8000/v1", "model": "m"}
    found = [w.split(":")[0] for k in ("sft_checkpoint", "rl_checkpoint", "raw_cots")
             for w in nondeterministic_settings(off[k], k)]
    assert found == ["sft_checkpoint.device cuda", "rl_checkpoint.launcher accelerate", "raw_cots.generator"]


def test_audit_compares_installed_versions_with_the_lock(tmp_path):
    assert audit_lock(tmp_path)[0].status == SKIP  # no lock file
    lock = tmp_path / "requirements" / "cpu.lock"
    lock.parent.mkdir()
    pyyaml = metadata.version("pyyaml")
    lock.write_text(f"pyyaml=={pyyaml} \\\n    --hash=sha256:00\n    # via dvc\n")
    assert audit_lock(tmp_path)[0].status == PASS
    major, minor, *_ = pyyaml.split(".")
    lock.write_text(f"PyYAML=={major}.{int(minor) + 1}.0\nno-such-package==1.0\n")
    (row,) = audit_lock(tmp_path)
    assert row.status == FAIL
    assert f"pyyaml {major}.{int(minor) + 1}.0 -> {pyyaml}" in row.detail and "no-such-package 1.0 not installed" \
        in row.detail
    lock.write_text(f"pyyaml=={pyyaml}+build1\n")  # the same release, another build: a warning
    assert audit_lock(tmp_path)[0].status == WARN
