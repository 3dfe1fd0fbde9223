"""Class 11 of issue 21: a category name with path characters reached `plan` as a "dependency cycle".

Promise: a category (or any foreach key) that is not a plain name (lower-case letters, digits and '_', starting with
a letter) is refused by `python -m dagster_project plan` with one line naming params.yaml, the key it came from and
the bad name; exit 2. The stage CLI refuses it too (params schema). Before: `a/../violence` produced outs that
normalise to another category's, and plan reported a dependency cycle; names like `Violence` passed silently.
"""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dagster_project.manifest import DvcManifest, ManifestError, Out, ParamRef, StageItem
from dagster_project.plan import plan
from pipelines.errors import PipelineError
from pipelines.params import parse_params
from test_hostile_common import ROOT, make_project, minimal_params

GOOD = ["violence", "erotic", "self_harm"]
BAD_PIECES = ["/", "\\", "..", " ", ":", "*", "?", "@", "$", "{", "}", "-", ".", "é", "\t", "#", "~", "%", "A", "Z",
              "'", '"', "\n", "&", "|"]


def bad_name(rng: random.Random) -> str:
    kind = rng.randrange(5)
    letters = "".join(rng.choice("abcxyz_") for _ in range(rng.randint(1, 8)))
    if kind == 0:
        return "a" + letters + "".join(rng.choice(BAD_PIECES) for _ in range(rng.randint(1, 3))) + letters
    if kind == 1:
        return rng.choice(["../", "a/../", "./", "/", "data/"]) + rng.choice(GOOD)
    if kind == 2:
        return rng.choice(["1", "_", "9a", "V"]) + letters
    if kind == 3:
        return letters.upper() or "X"
    return rng.choice(["", " ", "violence ", " violence", "violence\n", "viol ence", "violence/", "vio.lence"])


def synthetic_manifest(root: Path, categories) -> DvcManifest:
    """The items DVC would make of the three per-category stages, paths normalised the way DVC does."""
    norm = lambda p: os.path.normpath(p).replace(os.sep, "/")  # noqa: E731
    items, raw = [], {}
    stages = {
        "spec_chunks": (["data/spec/categories/{c}.md"], ["data/spec_chunks/{c}.md"]),
        "raw_cots": (["data/spec_chunks/{c}.md", "data/prompts/{c}.jsonl"], ["data/raw_cots/{c}.jsonl"]),
        "judged_cots": (["data/raw_cots/{c}.jsonl"], ["data/judged_cots/{c}.jsonl"]),
    }
    for stage, (deps, outs) in stages.items():
        raw[stage] = {"foreach": "${categories}", "do": {"cmd": f"python -m pipelines {stage} --category ${{item}}"}}
        for c in categories:
            items.append(StageItem(
                name=f"{stage}@{c}", stage=stage, key=c, cmd=f"python -m pipelines {stage} --category {c}",
                deps=tuple(norm(d.format(c=c)) for d in deps), outs=tuple(Out(norm(o.format(c=c))) for o in outs),
                params=(ParamRef("params.yaml", stage),)))
    return DvcManifest(root, items, raw, lock={}, params_files={"params.yaml": {"categories": list(categories)}})


N_NAMES = 150


def test_plan_refuses_a_bad_category_name_by_name(tmp_path):
    rng = random.Random(0)
    tried = set()
    for case in range(N_NAMES):
        name = bad_name(rng)
        tried.add(name)
        cats = GOOD[:rng.randint(1, 3)]
        cats.insert(rng.randint(0, len(cats)), name)
        with pytest.raises(ManifestError) as e:
            plan(tmp_path, status={}, manifest=synthetic_manifest(tmp_path, cats))
        msg = str(e.value)
        assert "\n" not in msg and "params.yaml: categories" in msg and "cycle" not in msg, (name, msg)
        assert repr(name[:60]) in msg, (name, msg)
    assert len(tried) >= 100
    # good names plan normally
    entries = plan(tmp_path, status={}, manifest=synthetic_manifest(tmp_path, GOOD))
    assert {e.item for e in entries} == {f"{s}@{c}" for s in ("spec_chunks", "raw_cots", "judged_cots") for c in GOOD}


def test_the_stage_cli_schema_refuses_them_too(tmp_path):
    rng = random.Random(1)
    project = make_project(tmp_path / "p")
    for case in range(50):
        name = bad_name(rng)
        p = minimal_params(categories=["violence", name],
                           paths={"spec": str(project / "data/spec"), "prompts": str(project / "data/prompts")})
        with pytest.raises(PipelineError) as e:
            parse_params(p)
        assert "categories" in str(e.value) and "\n" not in str(e.value)


def test_plan_command_end_to_end(tmp_path):
    """The real `python -m dagster_project plan` (DVC resolves dvc.yaml) on a copy with `a/../violence` listed."""
    d = tmp_path / "repo"
    d.mkdir()
    shutil.copy(ROOT / "dvc.yaml", d / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["categories"] = ["a/../violence", *params["categories"]]
    (d / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DVC_NO_ANALYTICS": "1"}
    dvc = Path(sys.executable).with_name("dvc")
    subprocess.run([str(dvc), "init", "--no-scm", "-q"], cwd=d, env=env, check=True, timeout=120)
    p = subprocess.run([sys.executable, "-m", "dagster_project", "--project-dir", str(d), "plan"], cwd=d, env=env,
                       capture_output=True, text=True, timeout=120)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2, p.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: params.yaml: categories: 'a/../violence'"), p.stderr
