"""Build a throwaway git + DVC copy of this project for end-to-end tests of DVC itself (remotes, experiments, cards).

The copy has the real `pipelines/`, spec, prompts and (a subset of) the real `dvc.yaml`, the fake generator, a tiny
random-weight base model committed to git, and by default two categories instead of seven, so one `dvc repro` of
the spine takes ~10-20 s on two busy cores. Every command runs in a subprocess as a user would type it.

    repo = build_repo(tmp_path / "origin")
    sh("dvc repro", repo)
    lock_outs(repo)           # {out path: md5} as recorded in dvc.lock
    dvc_md5(repo / "data/sft_dataset")   # the same digest computed from the files, independently of DVC
"""
from __future__ import annotations

import atexit
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Mapping

import yaml

from conftest import ROOT, fake_params
from tiny_model import make_tiny_model

SPINE = ("base_model", "refusal_classifier", "spec_chunks", "raw_cots", "judged_cots", "sft_dataset")
# Two categories keep every end-to-end run short; both have prompts of all three expected labels.
CATEGORIES = ("self_harm", "violence")
# Identity for commits made inside the temp repos (the machine may have no global git config).
GIT_IDENTITY = "git config user.email tests@example.invalid && git config user.name tests"


def tool_env(extra: Mapping[str, str] | None = None, *, cwd: Path | None = None) -> dict:
    """Environment for dvc/git/python subprocesses: this venv first on PATH, one thread per process, no analytics."""
    env = {**os.environ}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1", "GIT_TERMINAL_PROMPT": "0"})
    if cwd is not None:
        env["PYTHONPATH"] = str(cwd)  # the repo's own copy of `pipelines`, as `dvc repro` would import it
    env.update(extra or {})
    return env


def sh(cmd: str, cwd: Path, *, check: bool = True, env: Mapping[str, str] | None = None,
       timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a shell command in `cwd`; on failure raise with the command's output tail."""
    proc = subprocess.run(cmd, cwd=cwd, env=tool_env(env, cwd=Path(cwd)), shell=True, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"`{cmd}` failed ({proc.returncode}) in {cwd}:\n"
                             f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc


def select_stages(dvc_yaml: dict, stages: Iterable[str]) -> dict:
    """The named stages of a parsed dvc.yaml (in dvc.yaml's order), plus its top-level metrics/plots sections."""
    wanted = set(stages)
    missing = wanted - set(dvc_yaml["stages"])
    if missing:
        raise KeyError(f"not in dvc.yaml: {sorted(missing)}")
    out = {k: v for k, v in dvc_yaml.items() if k not in ("stages", "artifacts")}
    out["stages"] = {k: v for k, v in dvc_yaml["stages"].items() if k in wanted}
    return out


def build_repo(dest: Path, *, stages: Iterable[str] = SPINE, categories: Iterable[str] = CATEGORIES,
               params: Mapping[str, object] | None = None, dvc_yaml: dict | None = None,
               dvc_config: str | None = None, commit: bool = True) -> Path:
    """Create a git + DVC repo at `dest` holding this project with the fake generator and a tiny base model.

    Args:
        stages: dvc.yaml stages to keep (default: the spine, which needs no training).
        categories: the `categories` list of the temp params.yaml.
        params: extra dotted overrides for params.yaml (`{"judged_cots.judge.threshold": 5}`).
        dvc_yaml: a whole dvc.yaml mapping to use instead of selecting from the project's.
        dvc_config: text for .dvc/config (e.g. the project's own, to test its default remote).
        commit: make an initial commit of everything (needed for clones and experiments).

    Returns:
        `dest`.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for sub in ("pipelines", "data/spec", "data/prompts", "data/evals"):
        if (ROOT / sub).exists():
            shutil.copytree(ROOT / sub, dest / sub, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(ROOT / ".gitignore", dest / ".gitignore")
    if dvc_yaml is None:
        dvc_yaml = select_stages(yaml.safe_load((ROOT / "dvc.yaml").read_text()), stages)
    (dest / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    shutil.copytree(_tiny_model(), dest / "tiny_base")
    p = fake_params(categories=list(categories), **{"base_model.local_path": "tiny_base", **(params or {})})
    (dest / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    sh(f"git init -q -b main && {GIT_IDENTITY} && dvc init -q", dest)
    if dvc_config is not None:
        (dest / ".dvc/config").write_text(dvc_config)
    if commit:
        sh("git add -A && git commit -qm 'temp copy of the project'", dest)
    return dest


_CACHE: dict[str, Path] = {}  # built once per pytest process, copied per test


def _scratch() -> Path:
    if "scratch" not in _CACHE:
        d = Path(tempfile.mkdtemp(prefix="daf-dvc-repo-"))
        atexit.register(shutil.rmtree, d, True)
        _CACHE["scratch"] = d
    return _CACHE["scratch"]


def _tiny_model() -> Path:
    """The tiny base model, built once (~5 s of torch/tokenizers work) and copied into every repo."""
    if "tiny" not in _CACHE:
        _CACHE["tiny"] = make_tiny_model(_scratch() / "tiny_base")
    return _CACHE["tiny"]


def reproduced_spine(dest: Path) -> Path:
    """A repo at `dest` where `dvc repro` of the spine has run and its dvc.lock, metrics and cache are committed.

    The first call builds and runs it (~40 s); later calls in the same pytest process copy that result (git history,
    DVC cache and workspace included), so each test module gets its own independent repo cheaply.
    """
    if "spine" not in _CACHE:
        template = build_repo(_scratch() / "spine")
        sh("dvc repro", template, timeout=600)
        sh("git add -A && git commit -qm 'baseline run'", template)
        _CACHE["spine"] = template
    shutil.copytree(_CACHE["spine"], dest, symlinks=True)
    return Path(dest)


def read_lock(repo: Path) -> dict:
    return yaml.safe_load((Path(repo) / "dvc.lock").read_text())


def lock_outs(repo: Path) -> dict[str, str]:
    """{out path: md5} for every out of every stage in dvc.lock."""
    return {o["path"]: o["md5"] for s in read_lock(repo)["stages"].values() for o in s.get("outs", [])}


def ran_stages(log: str) -> set[str]:
    """Stages that DVC actually executed, from its `Running stage '...'` lines."""
    return set(re.findall(r"Running stage '([^']+)'", log))


def dvc_md5(path: Path) -> str:
    """The digest DVC 3 records for `path` (`hash: md5`), computed here without DVC.

    A file: md5 of its bytes. A directory: md5 of the JSON list of {"md5", "relpath"} of its files, sorted by
    relpath, plus the ".dir" suffix (the manifest DVC stores in its cache).
    """
    path = Path(path)
    if path.is_file():
        return hashlib.md5(path.read_bytes()).hexdigest()
    entries = sorted(
        ({"md5": hashlib.md5(f.read_bytes()).hexdigest(), "relpath": f.relative_to(path).as_posix()}
         for f in path.rglob("*") if f.is_file()),
        key=lambda e: e["relpath"],
    )
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"


def files_under(root: Path, skip: Iterable[str] = (".git",)) -> list[Path]:
    """Every regular file below `root`, except inside the named top-level folders."""
    skip = set(skip)
    return [p for p in Path(root).rglob("*") if p.is_file() and p.relative_to(root).parts[0] not in skip]
