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


def _trained(name: str, inputs: list, build) -> Path:
    """A measurement model trained on the project's labelled data, built once per content of its inputs.

    Every stage that reads a refusal (or rates harm) loads the trained model; tests that run stages in temp dirs find
    it through DAF_REFUSAL_CLASSIFIER / DAF_HARM_GRADER (pipelines.gold_sets.load_cached), which subprocesses
    inherit. The directory name hashes the labelled data and the model's code, so a change to either retrains;
    concurrent test processes race harmlessly (atomic rename).
    """
    import hashlib
    import tempfile

    h = hashlib.sha256()
    for f in sorted(p for i in inputs for p in ([ROOT / i] if (ROOT / i).is_file() else (ROOT / i).rglob("*"))):
        if f.is_file():
            h.update(f.relative_to(ROOT).as_posix().encode() + b"\0" + f.read_bytes())
    dest = Path(tempfile.gettempdir()) / f"daf-{name}-{h.hexdigest()[:16]}"
    if not (dest / "config.json").is_file():
        tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
        build(tmp, h.hexdigest())
        try:
            os.replace(tmp, dest)
        except OSError:  # another test process got there first
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _params_section(name: str) -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text()).get(name, {})


def _build_refusal_classifier(out: Path, sha: str) -> None:
    from pipelines.refusal_classifier import fit_and_score, load_gold

    model, _ = fit_and_score(load_gold(ROOT / "data/evals/refusal_gold"),
                             _params_section("refusal_classifier").get("l2_grid", [1e-3]), sha)
    model.save(out)


def _build_harm_grader(out: Path, sha: str) -> None:
    from pipelines.harm_grader import fit_and_score, load_rows, split_by_writer

    gold = ROOT / "data/evals/harm_gold"
    parts = split_by_writer(load_rows(gold / "rows.jsonl"), gold / "splits.yaml")
    model, _ = fit_and_score(parts, _params_section("harm_grader").get("l2_grid", [1.0]))
    model.save(out)


_MODEL_CODE = ["pipelines/refusal_model.py", "pipelines/refusal.py", "pipelines/gold_sets.py"]
if (ROOT / "data/evals/refusal_gold/splits.yaml").is_file():
    os.environ.setdefault("DAF_REFUSAL_CLASSIFIER", str(_trained(
        "refusal-classifier", ["data/evals/refusal_gold", "pipelines/refusal_classifier.py", *_MODEL_CODE],
        _build_refusal_classifier)))
if (ROOT / "data/evals/harm_gold/splits.yaml").is_file():
    os.environ.setdefault("DAF_HARM_GRADER", str(_trained(
        "harm-grader", ["data/evals/harm_gold", "pipelines/harm_ratings.py", "pipelines/harm_grader.py", *_MODEL_CODE],
        _build_harm_grader)))


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
