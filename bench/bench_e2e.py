"""End to end: the README run command (`make run`) on a fresh clone, with a per-stage breakdown.

Clones the committed HEAD of this repository into a temporary directory, runs `make run` there (install into .venv,
`dvc repro` of the whole pipeline on the embedded model), and stamps every output line with the time it
arrived. A stage's wall time runs from DVC's "Running stage '<item>'" line to the next stage's line (or the end of
`dvc repro`), so it includes the stage process's start-up and imports, which the stages' own times
(`data/.work/timings/`) do not. Use a warm pip cache (run `make setup` once anywhere) to measure the pipeline rather
than the downloads.

    python bench/bench_e2e.py [--keep] [--dest DIR]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, machine, summary

STAGE = re.compile(r"Running stage '([^']+)'")
GOAL_S = 15 * 60


def timed_lines(cmd: list[str], cwd: Path, log: Path):
    """Run cmd, yield (seconds since start, line) as lines arrive; the raw output also goes to `log`."""
    t0 = time.perf_counter()
    with log.open("w", encoding="utf-8") as f, subprocess.Popen(
            cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            env={**os.environ, "PYTHONUNBUFFERED": "1"}) as proc:
        for line in proc.stdout:
            f.write(line)
            yield time.perf_counter() - t0, line.rstrip("\n")
        if proc.wait():
            raise SystemExit(f"{' '.join(cmd)} failed with exit {proc.returncode}; see {log}")


def stage_times(events: list[tuple[float, str]], end: float) -> tuple[float, list[tuple[str, float]]]:
    """(seconds before the first stage, [(item, seconds)]) from the stamped lines."""
    starts = [(t, m.group(1)) for t, line in events for m in [STAGE.search(line)] if m]
    if not starts:
        return end, []
    bounds = [t for t, _ in starts[1:]] + [end]
    return starts[0][0], [(name, b - t) for (t, name), b in zip(starts, bounds)]


def by_stage(items: list[tuple[str, float]]) -> dict[str, tuple[int, float]]:
    out: dict[str, tuple[int, float]] = {}
    for name, s in items:
        stage = name.split("@")[0]
        n, total = out.get(stage, (0, 0.0))
        out[stage] = (n + 1, total + s)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dest", help="clone here (must not exist); default: a new temporary directory")
    ap.add_argument("--keep", action="store_true", help="keep the clone (default: deleted after the run)")
    args = ap.parse_args()

    dest = Path(args.dest) if args.dest else Path(tempfile.mkdtemp(prefix="bench-e2e-")) / "repo"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(dest)], check=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=dest, capture_output=True, text=True).stdout
    print(f"{machine()}; fresh clone of {head.strip()} in {dest}", flush=True)

    events = []
    for t, line in timed_lines(["make", "run"], dest, dest.parent / "make_run.log"):
        events.append((t, line))
        if STAGE.search(line):
            print(f"{t:7.1f}s  {line.strip()}", flush=True)
    total = events[-1][0] if events else 0.0
    before, items = stage_times(events, total)  # `dvc repro` is the last thing `make run` does

    print(f"\nbefore the first stage (venv, pip install, dvc start): {before:.1f}s")
    width = max((len(n) for n, _ in items), default=10)
    for name, s in items:
        print(f"  {name:<{width}}  {s:7.1f}s")
    print("per stage (items, total):")
    stages = by_stage(items)
    for stage, (n, s) in sorted(stages.items(), key=lambda kv: -kv[1][1]):
        print(f"  {stage:<16} x{n:<2} {s:7.1f}s  ({s / max(total, 1e-9):.0%} of all)")
    print(f"total: {total:.1f}s = {total / 60:.1f} min; goal <= {GOAL_S // 60} min")
    top = ", ".join(f"{st} {s:.0f}s" for st, (_, s) in sorted(stages.items(), key=lambda kv: -kv[1][1])[:4])
    summary("e2e", f"make run on a fresh clone: {total / 60:.1f} min (install {before:.0f}s, pipeline "
            f"{total - before:.0f}s; slowest: {top}); goal <= 15 min: {'met' if total <= GOAL_S else 'missed'}")
    if not args.keep:
        shutil.rmtree(dest.parent, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
