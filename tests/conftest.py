"""Shared fixtures: a copy of the project's human-edited inputs in a temp dir, and params for fast fake runs."""
from __future__ import annotations

import os

# One torch thread per test process (and the subprocesses it starts): the tests use tiny models, where threads only
# add overhead, and several processes each spinning two OpenMP threads on a 2-core machine slow torch down ~30x.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def fake_params(**overrides) -> dict:
    """params.yaml content for a fast run: the fake generator, few prompts, the real spec and prompts."""
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["raw_cots"]["generator"] = {"kind": "fake"}
    p["raw_cots"]["max_prompts"] = 4
    p["raw_cots"]["shard_size"] = 2
    for dotted, value in overrides.items():
        node = p
        *head, last = dotted.split(".")
        for k in head:
            node = node.setdefault(k, {})
        node[last] = value
    return p


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A temp project dir with data/spec and data/prompts copied in and a fake-backend params.yaml; cwd is set to it."""
    for sub in ("data/spec", "data/prompts", "data/evals"):
        if (ROOT / sub).exists():
            shutil.copytree(ROOT / sub, tmp_path / sub)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(fake_params(), sort_keys=False))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_cli(*args: str, cwd: Path, check: bool = False, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m pipelines ...` as dvc.yaml does, in `cwd`, with this checkout importable."""
    e = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "pipelines", *args], cwd=cwd, env=e, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"pipelines {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc
