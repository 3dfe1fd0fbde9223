"""No-op rerun overhead on a real, fully reproduced project (the whole DAG with real checkpoints, not the spine).

Everything is up to date (run `make run` first, or point --repo at a clone where it ran). Timed side by side:
plain `dvc status`, the README run command's `dvc repro`, and the Dagster `full_pipeline` job in-process, once with
the asset-check outcome cache emptied (every check runs: three of them load a checkpoint and generate) and once
with it as the first run left it (what a user's second "materialize all" costs). Goal: <= 1.5x `dvc status`.

    python bench/bench_noop.py [--repo DIR]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, dagster_noop, machine, summary


def timed(cmd: list[str], repo: Path) -> tuple[str, float]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed in {repo}:\n{p.stderr[-2000:]}")
    return p.stdout, dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", type=Path, default=ROOT, help="an up-to-date DVC project (default: this checkout)")
    args = ap.parse_args()
    repo = args.repo.resolve()
    out, status_s = timed(["dvc", "status"], repo)
    if "up to date" not in out:
        raise SystemExit(f"{repo}: `dvc status` reports changes; run `make run` there first:\n{out[-1500:]}")
    print(f"{machine()}; {repo}")
    _, repro_s = timed(["dvc", "repro"], repo)
    cache = repo / ".dvc/tmp/dagster_check_outcomes.json"
    cache.unlink(missing_ok=True)
    cold_s, n_items, n_checks, _ = dagster_noop(repo)
    warm_s, _, _, cached = dagster_noop(repo)
    print(f"dvc status {status_s:.2f}s; no-op dvc repro {repro_s:.2f}s = x{repro_s / status_s:.2f}")
    print(f"Dagster full_pipeline ({n_items} items, {n_checks} checks): check cache empty {cold_s:.2f}s = "
          f"x{cold_s / status_s:.2f}; second run ({cached} checks from the cache) {warm_s:.2f}s = "
          f"x{warm_s / status_s:.2f}; goal <= x1.5")
    summary("noop", f"full DAG ({n_items} items): no-op dvc repro = x{repro_s / status_s:.2f} dvc status, Dagster "
            f"full_pipeline = x{cold_s / status_s:.2f} with every check run, x{warm_s / status_s:.2f} with "
            f"{cached} checkpoint checks cached (goal <= 1.5)")


if __name__ == "__main__":
    main()
