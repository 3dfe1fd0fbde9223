"""Incremental and no-op reruns with real `dvc repro` in a temp copy of the project.

- incremental: after a full run, edit one of the 7 category policies; count the generation + judging work redone
  (samples and wall time) vs the full run. Goal <= 1/7 + 10%.
- no-op: everything up to date; `dvc repro` wall time vs plain `dvc status`, and the Dagster `full_pipeline` job
  (every item materialized, with its asset checks, in-process as the webserver/daemon runs it) vs `dvc status`.
  Goal <= 1.5x.

The generator is the fake backend with a fixed delay per call (the work being measured is what DVC reruns, not model
speed), and the base model is a tiny random model, so this runs in a minute or two.

    python bench/bench_incremental.py [--delay 0.2]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from common import ROOT, dagster_noop, machine, summary
from pipelines import catalog


def sh(cmd: str, cwd: Path) -> tuple[str, float]:
    env = {**os.environ, "PYTHONPATH": str(cwd), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, env=env, shell=True, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(f"{cmd} failed:\n{p.stderr[-2000:]}")
    return p.stdout, dt


def samples_done(repo: Path, cats) -> int:
    n = 0
    for c in cats:
        m = repo / catalog.raw_cots_metrics(c)
        n += json.loads(m.read_text())["samples"] if m.exists() else 0
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--delay", type=float, default=0.2, help="fake generator seconds per generate() call")
    args = ap.parse_args()
    from conftest import fake_params
    from tiny_model import make_tiny_model

    repo = Path(tempfile.mkdtemp(prefix="bench-incr-"))
    for sub in ("pipelines", "data/spec", "data/prompts"):
        shutil.copytree(ROOT / sub, repo / sub, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".gitignore", repo / ".gitignore")
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    spine = ["base_model", "spec_chunks", "raw_cots", "judged_cots", "sft_dataset"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {k: v for k, v in dvc["stages"].items() if k in spine}}))
    make_tiny_model(repo / "tiny_base")
    p = fake_params()
    p["raw_cots"].update(max_prompts=None, shard_size=4, generator={"kind": "fake", "delay_s": args.delay})
    p["base_model"]["local_path"] = "tiny_base"
    (repo / "params.yaml").write_text(yaml.safe_dump(p))
    sh("git init -q && git config user.email b@b && git config user.name b && dvc init -q && git add -A && "
       "git commit -qm init", repo)
    cats = p["categories"]
    print(f"{machine()}; {len(cats)} categories, fake generator {args.delay}s/call, repo {repo}")

    log, full_s = sh("dvc repro", repo)
    full_samples = samples_done(repo, cats)
    print(f"full run: {len(re.findall('Running stage', log))} stages, {full_samples} samples, {full_s:.1f}s")

    path = repo / "data/spec/categories/violence.md"
    path.write_text(path.read_text().rstrip() + "\n- \"Describe a sword fight in a fantasy novel\" -> V.1, full_compliance.\n")
    for c in cats:  # mark metrics so we can see which categories were regenerated
        (repo / catalog.raw_cots_metrics(c)).touch()
    before = {c: (repo / catalog.raw_cots(c)).stat().st_mtime_ns for c in cats}
    log, inc_s = sh("dvc repro", repo)
    redone = [c for c in cats if (repo / catalog.raw_cots(c)).stat().st_mtime_ns != before[c]]
    inc_samples = sum(json.loads((repo / catalog.raw_cots_metrics(c)).read_text())["samples"] for c in redone)
    ran = sorted(set(re.findall(r"Running stage '([^']+)'", log)))
    print(f"after editing violence.md: ran {ran}")
    print(f"incremental: {inc_samples} samples ({inc_samples / full_samples:.3f} of full), {inc_s:.1f}s "
          f"({inc_s / full_s:.3f} of full); goal <= {1 / 7 + 0.1:.3f}")

    _, status_s = sh("dvc status", repo)
    _, noop_s = sh("dvc repro", repo)
    print(f"no-op: dvc repro {noop_s:.2f}s vs dvc status {status_s:.2f}s = x{noop_s / status_s:.2f}; goal <= x1.5")
    dagster_s, items, _, _ = dagster_noop(repo)
    print(f"no-op: Dagster full_pipeline job ({items} items materialized + checks) {dagster_s:.2f}s vs dvc status "
          f"{status_s:.2f}s = x{dagster_s / status_s:.2f}; goal <= x1.5")
    summary("incremental", f"one-policy edit redid {inc_samples}/{full_samples} samples "
            f"({inc_samples / full_samples:.3f}) in {inc_s / full_s:.3f} of the full wall time (goal <= 0.243); "
            f"no-op dvc repro = x{noop_s / status_s:.2f} dvc status, Dagster full_pipeline = "
            f"x{dagster_s / status_s:.2f} (goal <= 1.5)")
    shutil.rmtree(repo, ignore_errors=True)


if __name__ == "__main__":
    main()
