"""Params profiles (configs/profiles/*.yaml, pipelines/profiles.py): each overlay validates when merged over
params.yaml, holds only keys that change something, and reaches params.yaml through DVC's own `-S` code unchanged;
a bad overlay fails naming file and key. Plus the prompt caps every stage that reads data/prompts honours."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, fake_params, run_cli
from pipelines.errors import PipelineError
from pipelines.profiles import as_dvc_writes, compose, leaves
from pipelines.io import read_yaml

PROFILES = sorted((ROOT / "configs/profiles").glob("*.yaml"))


@pytest.fixture
def project(tmp_path, monkeypatch):
    """The project's params.yaml and human-edited inputs in a temp dir (the schema checks paths from the cwd)."""
    for sub in ("data/spec", "data/prompts"):
        shutil.copytree(ROOT / sub, tmp_path / sub)
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _overlay(project, data) -> str:
    (project / "o.yaml").write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return "o.yaml"


def _get(d, dotted):
    for part in dotted.split("."):
        d = d[part]
    return d


def test_there_is_a_full_profile():
    assert ROOT / "configs/profiles/full.yaml" in PROFILES


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.name)
def test_profile_validates_changes_only_what_it_lists_and_survives_dvc(project, profile):
    merged, args = compose(profile)  # parse_params on the merge, then DVC's override code on a copy of params.yaml
    base = read_yaml(project / "params.yaml")
    keys = leaves(read_yaml(profile), str(profile))
    for key, value in keys:
        assert _get(merged, key) == value
        assert _get(base, key) != value, f"{profile.name}: {key} is already {value!r} in params.yaml"
    assert len(args) == 2 * len(keys) and args[::2] == ["-S"] * len(keys)
    assert as_dvc_writes(project / "params.yaml", args) == merged  # the experiment runs exactly the merge


def test_full_profile_uses_every_training_prompt(project):
    merged, _ = compose(ROOT / "configs/profiles/full.yaml")
    assert merged["raw_cots"]["max_prompts_per_category"] is None and merged["raw_cots"]["max_prompts"] is None
    assert merged["rl_checkpoint"]["max_prompts_per_category"] is None


@pytest.mark.parametrize("overlay, words", [
    ({"raw_cots": {"n_sampels": 3}}, "o.yaml: raw_cots.n_sampels: unknown key"),
    ({"rl_chekpoint": {"max_steps": 3}}, "o.yaml: rl_chekpoint: unknown key"),
    ({"raw_cots": {"n_samples": "3"}}, "o.yaml: raw_cots.n_samples: Input should be a valid integer"),
    ({"rl_checkpoint": {"harmful_share": 1.5}}, "o.yaml: rl_checkpoint.harmful_share: Input should be less than"),
    ({"eval_scores": {"generators": {}}}, "o.yaml: eval_scores.generators: empty mapping"),
    # DVC writes 5e-06, which YAML 1.1 (our reader) reads as a string: refused before anything runs
    ({"rl_checkpoint": {"learning_rate": 5.0e-06}}, "o.yaml: rl_checkpoint.learning_rate: dvc exp run -S would leave"),
    ("[1, 2]", "o.yaml: a params overlay must be a non-empty mapping"),
])
def test_bad_overlay_fails_naming_the_key(project, overlay, words):
    with pytest.raises(PipelineError) as e:
        compose(project / _overlay(project, overlay))
    assert words in str(e.value) and "\n" not in str(e.value), str(e.value)


def _profiles_cli(*args: str, cwd) -> subprocess.CompletedProcess:
    """`python -m pipelines.profiles ...` as `make run-full` calls it, with this checkout importable."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pipelines.profiles", *args], cwd=cwd, env=env, capture_output=True,
                          text=True)


def test_cli_prints_the_experiment_command_and_refuses_a_bad_overlay(project):
    proc = _profiles_cli(str(ROOT / "configs/profiles/full.yaml"), cwd=project)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("dvc exp run -n full -S ") and "rl_checkpoint.max_prompts_per_category=null" in \
        proc.stdout
    bad = _profiles_cli(_overlay(project, {"raw_cots": {"n_sampels": 3}}), "--run", cwd=project)
    err = [ln for ln in bad.stderr.splitlines() if ln.startswith("error:")]
    assert bad.returncode == 2 and len(err) == 1 and "raw_cots.n_sampels: unknown key" in err[0] and not bad.stdout


# ---------------------------------------------------------------------------- the prompt caps of the stages
def test_raw_cots_honours_the_prompt_cap(workdir):
    """raw_cots (fake generator) takes the first max_prompts_per_category rows, then max_prompts of them."""
    p = fake_params(categories=["violence"])
    picked = {}
    for cap, subset in ((14, 6), (None, None)):
        p["raw_cots"].update(max_prompts_per_category=cap, max_prompts=subset, n_samples=1)
        (workdir / "params.yaml").write_text(yaml.safe_dump(p))
        run_cli("spec_chunks", "--category", "violence", cwd=workdir, check=True)
        run_cli("raw_cots", "--category", "violence", cwd=workdir, check=True)
        rows = [json.loads(ln) for ln in (workdir / "data/raw_cots/violence.jsonl").read_text().splitlines()]
        picked[cap] = {r["prompt_id"] for r in rows}
    first = [json.loads(ln)["id"] for ln in (workdir / "data/prompts/violence.jsonl").read_text().splitlines()]
    assert len(first) >= 60
    assert len(picked[14]) == 6 and picked[14] <= set(first[:14])  # the default: 6 of the first 14
    assert picked[None] == set(first)  # the full profile: every row
