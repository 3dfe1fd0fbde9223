"""Class 10 of issue 21: concurrent writers of one output crashed each other.

Promise: any number of processes writing the same destination at once through `atomic_path` (a file, or a directory
swapped in whole) all succeed; the destination is always one writer's complete output; no temp or moved-aside
directory stays behind once they are done; leftovers of a killed writer are removed by the next write, those of a
live writer are not. Before: the stale-temp cleanup deleted another live process's temp dir (two stage commands on
one output 60-80 ms apart, e.g. the CLI and Dagster) and one of them crashed.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import time
from pathlib import Path


from pipelines.io import atomic_path, write_text

CTX = mp.get_context("fork")  # cheap processes that share the imported modules


def writer(dest: str, is_dir: bool, token: str, writes: int, hold_s: float, seed: int) -> None:
    """One process: `writes` atomic writes of `dest`, each holding its temp for a while before the rename."""
    rng = random.Random(seed)
    for w in range(writes):
        tag = f"{token}.{w}"
        with atomic_path(dest, is_dir=is_dir) as tmp:
            if is_dir:
                tmp.mkdir(exist_ok=True)
                (tmp / "a.txt").write_text(tag)
                time.sleep(rng.uniform(0, hold_s))
                (tmp / "b.txt").write_text(tag)
            else:
                with open(tmp, "w") as f:
                    f.write(tag[: len(tag) // 2])
                    f.flush()
                    time.sleep(rng.uniform(0, hold_s))
                    f.write(tag[len(tag) // 2:])
        time.sleep(rng.uniform(0, hold_s / 3))


def leftovers(dest: Path):
    return sorted(p.name for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}."))


N_SCHEDULES = 24


def test_concurrent_writers_of_one_destination_all_succeed(tmp_path):
    rng = random.Random(0)
    processes_run = 0
    for case in range(N_SCHEDULES):
        is_dir = case % 2 == 1
        dest = tmp_path / f"case{case}" / ("outdir" if is_dir else "out.json")
        n = rng.randint(2, 5)
        hold = rng.choice([0.005, 0.02, 0.05])
        procs = [CTX.Process(target=writer, args=(str(dest), is_dir, f"p{i}", rng.randint(1, 4), hold, rng.random()))
                 for i in range(n)]
        for p in procs:
            p.start()
            time.sleep(rng.uniform(0, 0.01))
        for p in procs:
            p.join(timeout=30)
        processes_run += n
        codes = [p.exitcode for p in procs]
        assert codes == [0] * n, (case, codes)
        if is_dir:
            a, b = (dest / "a.txt").read_text(), (dest / "b.txt").read_text()
            assert a == b and a.startswith("p"), (a, b)  # one writer's complete output
            assert sorted(os.listdir(dest)) == ["a.txt", "b.txt"]
        else:
            assert dest.read_text().startswith("p") and "." in dest.read_text()
        assert leftovers(dest) == [], leftovers(dest)
    assert processes_run >= 60


def _hang_in_write(dest: str) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text("half")
        time.sleep(60)


def test_leftovers_of_a_killed_writer_go_those_of_a_live_one_stay(tmp_path):
    dest = tmp_path / "out.json"
    live = CTX.Process(target=_hang_in_write, args=(str(dest),))
    killed = CTX.Process(target=_hang_in_write, args=(str(dest),))
    live.start()
    killed.start()
    try:
        deadline = time.monotonic() + 10
        while len(leftovers(dest)) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(leftovers(dest)) == 2
        os.kill(killed.pid, signal.SIGKILL)
        killed.join()
        write_text(dest, "new")  # removes the dead writer's temp, keeps the live one's
        left = leftovers(dest)
        assert left == [n for n in left if f".{live.pid}." in n] and len(left) == 1, left
        assert dest.read_text() == "new"
    finally:
        live.kill()
        live.join()
    write_text(dest, "again")
    assert leftovers(dest) == []
    # a leftover in the naming of the code before pids were added is always stale
    (tmp_path / ".out.json.abcd1234.tmp").mkdir()
    (tmp_path / ".out.json.old").mkdir()
    write_text(dest, "third")
    assert leftovers(dest) == []
