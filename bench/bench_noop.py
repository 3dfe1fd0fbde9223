"""No-op rerun overhead on a real, fully reproduced project (the whole DAG with real checkpoints, not the spine).

Everything is up to date (run `make run` first, or point --repo at a clone where it ran). Timed side by side:
plain `dvc status`, `dvc repro`, the README run command `make run` (its install check + `dvc repro`), and the Dagster `full_pipeline` job in-process: first with
the asset-check outcome cache emptied (every check runs: three of them load a checkpoint and generate), then with the
cache as that run left it (what every later "materialize all" costs). The three commands are timed in turns,
--repeat times, and the medians compared. Goal: <= 1.5x `dvc status`.

    python bench/bench_noop.py [--repo DIR] [--repeat 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
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
    ap.add_argument("--repeat", type=int, default=3, help="runs of each command (the median is reported)")
    args = ap.parse_args()
    repo = args.repo.resolve()
    out, _ = timed(["dvc", "status"], repo)
    if "up to date" not in out:
        raise SystemExit(f"{repo}: `dvc status` reports changes; run `make run` there first:\n{out[-1500:]}")
    print(f"{machine()}; {repo}; median of {args.repeat} runs each, interleaved")
    cache = repo / ".dvc/tmp/dagster_check_outcomes.json"
    cache.unlink(missing_ok=True)
    cold_s, n_items, n_checks, _ = dagster_noop(repo)  # once: the first run fills the cache
    runs: dict = {"status": [], "repro": [], "make": [], "dagster": []}
    cached = 0
    for _ in range(args.repeat):
        runs["status"].append(timed(["dvc", "status"], repo)[1])
        runs["repro"].append(timed(["dvc", "repro"], repo)[1])
        runs["make"].append(timed(["make", "-s", "run"], repo)[1])  # the README run command, install check included
        dt, _, _, cached = dagster_noop(repo)
        runs["dagster"].append(dt)
    status_s, repro_s, make_s, warm_s = (statistics.median(runs[k]) for k in ("status", "repro", "make", "dagster"))
    print(f"dvc status {status_s:.2f}s; no-op dvc repro {repro_s:.2f}s = x{repro_s / status_s:.2f}; "
          f"make run {make_s:.2f}s = x{make_s / status_s:.2f}")
    print(f"Dagster full_pipeline ({n_items} items, {n_checks} checks): check cache empty {cold_s:.2f}s = "
          f"x{cold_s / status_s:.2f}; later runs ({cached} checks from the cache) {warm_s:.2f}s = "
          f"x{warm_s / status_s:.2f}; goal <= x1.5")
    summary("noop", f"full DAG ({n_items} items): no-op make run = x{make_s / status_s:.2f} dvc status "
            f"(dvc repro x{repro_s / status_s:.2f}), Dagster "
            f"full_pipeline = x{cold_s / status_s:.2f} with every check run, x{warm_s / status_s:.2f} with "
            f"{cached} checkpoint checks cached (goal <= 1.5)")


if __name__ == "__main__":
    main()
