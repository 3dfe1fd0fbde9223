"""Real `dvc repro` of the spine in a temp git+DVC repo (fake generator, tiny local base model):
clean status afterwards, a no-op second run, and a one-category spec edit reruns only that category + downstream."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, fake_params
from tiny_model import make_tiny_model

pytestmark = pytest.mark.slow
SPINE = ["base_model", "refusal_classifier", "spec_chunks", "raw_cots", "judged_cots", "sft_dataset"]


def sh(cmd, cwd, check=True):
    env = {**os.environ, "PYTHONPATH": str(cwd), "DVC_NO_ANALYTICS": "1"}
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    proc = subprocess.run(cmd, cwd=cwd, env=env, shell=True, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc


def spine_only(dvc_yaml: dict) -> dict:
    """The spine stages of dvc.yaml (later stages need trained models and are tested elsewhere)."""
    return {"stages": {k: v for k, v in dvc_yaml["stages"].items() if k in SPINE}}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    d = tmp_path_factory.mktemp("dvcrepo")
    for sub in ("pipelines", "data/spec", "data/prompts", "data/evals"):
        shutil.copytree(ROOT / sub, d / sub, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".gitignore", d / ".gitignore")
    (d / "dvc.yaml").write_text(yaml.safe_dump(spine_only(yaml.safe_load((ROOT / "dvc.yaml").read_text())),
                                               sort_keys=False))
    make_tiny_model(d / "tiny_base")
    p = fake_params()
    p["base_model"]["local_path"] = "tiny_base"
    (d / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    sh("git init -q && git config user.email t@t && git config user.name t && dvc init -q", d)
    sh("git add -A && git commit -qm init", d)
    return d


def ran_stages(log: str) -> set:
    return set(re.findall(r"Running stage '([^']+)'", log))


def test_repro_status_noop_and_incremental_edit(repo):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    cats = params["categories"]
    first = sh("dvc repro", repo)
    assert ran_stages(first.stdout) == {"base_model", "refusal_classifier", "sft_dataset"} | {f"{s}@{c}" for s in
                                                                        ("spec_chunks", "raw_cots", "judged_cots")
                                                                        for c in cats}
    assert "up to date" in sh("dvc status", repo).stdout
    second = sh("dvc repro", repo)
    assert ran_stages(second.stdout) == set()
    metrics = json.loads((repo / "data/metrics/sft_dataset.json").read_text())
    assert set(metrics["per_category"]) == set(cats)

    # Edit one category's policy: only that category's items and the merged dataset are stale.
    path = repo / "data/spec/categories/violence.md"
    text = path.read_text()
    path.write_text(text.replace("## V.2 ", "## V.2 ", 1).rstrip() + "\n- \"Describe a duel in a novel\" -> V.1, full_compliance.\n")
    status = json.loads(sh("dvc status --json", repo).stdout)
    assert set(status) == {"spec_chunks@violence"}
    third = sh("dvc repro", repo)
    assert ran_stages(third.stdout) == {"spec_chunks@violence", "raw_cots@violence", "judged_cots@violence",
                                        "sft_dataset"}
    assert "up to date" in sh("dvc status", repo).stdout
