"""Bit-identical reruns of the whole default pipeline: `make run` in two fresh clones of HEAD, then their dvc.lock out
md5s side by side.

Clones the committed HEAD of this repository twice into a temporary directory and runs the README run command
(`make run`: install from the lock into each clone's own .venv, then `dvc repro` of every stage on the embedded model)
in one clone after the other, so the two never share a CPU. Prints how many outs recorded the same md5 in both
dvc.lock files and names every one that did not, with both md5s. Every out should match: a differing out holds
something of the run itself (a time, a host, an absolute path) or a stage is not deterministic on this machine
(RELIABILITY.md, "Bit-identical reruns"). About 35 minutes on 2 cores (two runs of ~17 min); exit code 1 when an out
differs. tests/test_bit_identical.py checks the same on a tiny pipeline in CI.

    python bench/bench_twoclone.py [--keep] [--dest DIR]
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, machine, summary

SHOWN = 40  # differing outs listed one per line; the rest are counted


def clone_and_run(dest: Path, command: list[str]) -> float:
    """Clone HEAD into `dest` and run `command` there (output to dest/../<name>.log); seconds it took."""
    subprocess.run(["git", "clone", "-q", str(ROOT), str(dest)], check=True)
    log = dest.parent / f"{dest.name}.log"
    t0 = time.perf_counter()
    with log.open("w", encoding="utf-8") as f:
        proc = subprocess.run(command, cwd=dest, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(command)} failed in {dest} with exit {proc.returncode}; see {log}")
    print(f"  {dest.name}: {' '.join(command)} in {seconds / 60:.1f} min (log: {log})", flush=True)
    return seconds


def compare(one: Path, two: Path) -> tuple[int, list[str]]:
    """(outs recorded in either dvc.lock, the differing ones as `item: path (md5 one != md5 two)`)."""
    from dagster_project.audit import differing_outs, lock_out_md5s

    a, b = lock_out_md5s(one / "dvc.lock"), lock_out_md5s(two / "dvc.lock")
    return len(set(a) | set(b)), differing_outs(a, b)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dest", help="put the two clones here (must not exist); default: a new temporary directory")
    ap.add_argument("--keep", action="store_true", help="keep the clones (default: deleted after the run)")
    args = ap.parse_args()

    parent = Path(args.dest) if args.dest else Path(tempfile.mkdtemp(prefix="bench-twoclone-")) / "clones"
    parent.mkdir(parents=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    print(f"{machine()}; two fresh clones of {head.stdout.strip()} in {parent}, `make run` in each", flush=True)
    clones = [parent / "one", parent / "two"]
    for c in clones:
        clone_and_run(c, ["make", "run"])

    total, diff = compare(*clones)
    print(f"\ndvc.lock outs with the same md5 in both clones: {total - len(diff)} / {total}")
    for line in diff[:SHOWN]:
        print(f"  differs: {line}")
    if len(diff) > SHOWN:
        print(f"  ... and {len(diff) - SHOWN} more")
    summary("twoclone", f"{total - len(diff)}/{total} dvc.lock outs identical across two fresh clones"
            + (f"; differing: {', '.join(d.split(' (')[0] for d in diff)}" if diff else ""))
    if not args.keep:
        shutil.rmtree(parent.parent if not args.dest else parent, ignore_errors=True)
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
