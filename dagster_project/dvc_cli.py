"""Run the `dvc` CLI as a subprocess and stream its output line by line. No Dagster import.

The DVC process starts in its own process group. On an interrupt (Ctrl-C, a Dagster run termination) the whole group
gets SIGINT, the way a terminal would deliver it: DVC ignores SIGINT while a stage command runs and relies on the
command receiving it too. If the group has not exited after `grace_s`, it is terminated, then killed.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence

RAN = re.compile(r"Running stage '([^']+)'")
SKIPPED = re.compile(r"(?:Stage )?'([^']+)' didn't change, skipping")
RESTORED = re.compile(r"Stage '([^']+)' is cached - skipping run")  # DVC's run-cache restored the outs
PROGRESS = re.compile(r"\d+%\|")  # a tqdm frame


class DvcCommandError(Exception):
    """`dvc ...` exited non-zero; the message has the command, the exit code and DVC's own error lines."""

    def __init__(self, run: "DvcRun"):
        self.run = run
        errors = [ln for ln in run.lines if ln.lstrip().upper().startswith(("ERROR", "ERROR:"))]
        detail = " | ".join(errors[-3:]) or " | ".join(ln for ln in run.lines[-5:] if ln.strip())
        super().__init__(f"`{' '.join(run.args)}` failed (exit {run.returncode}): {detail[:1500]}")


@dataclass
class DvcRun:
    args: List[str]
    returncode: int
    lines: List[str] = field(default_factory=list)

    @property
    def ran(self) -> List[str]:
        """Stage items DVC executed."""
        return [m.group(1) for ln in self.lines for m in [RAN.search(ln)] if m]

    @property
    def reused(self) -> List[str]:
        """Stage items DVC did not execute: unchanged since dvc.lock, or restored from its run cache."""
        return [m.group(1) for ln in self.lines for m in [SKIPPED.search(ln) or RESTORED.search(ln)] if m]

    @property
    def stdout(self) -> str:
        return "\n".join(self.lines)


def dvc_env(extra: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """Environment for DVC and the stage commands it starts: this interpreter's bin dir first on PATH (so the
    `python` in dvc.yaml commands is the project's), unbuffered output, no analytics."""
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.update(extra or {})
    return env


def dvc_argv(args: Sequence[str], executable: Optional[str] = None, wait_for_lock: bool = True) -> List[str]:
    """`[python -m dvc | executable] [--wait-for-lock] args...`; the global flag goes before the subcommand."""
    base = [executable] if executable else [sys.executable, "-m", "dvc"]
    return [*base, *(["--wait-for-lock"] if wait_for_lock else []), *args]


def run_dvc(
    args: Sequence[str],
    cwd: str | Path,
    on_line: Optional[Callable[[str], None]] = None,
    *,
    executable: Optional[str] = None,
    wait_for_lock: bool = True,
    env: Optional[Mapping[str, str]] = None,
    check: bool = True,
    grace_s: float = 60.0,
) -> DvcRun:
    """Run `dvc args...` in `cwd`, calling `on_line` for each output line (stdout and stderr merged) as it arrives.

    Returns the finished `DvcRun`; with `check`, a non-zero exit raises `DvcCommandError`. Any exception while
    waiting (KeyboardInterrupt, Dagster's interrupt) is forwarded to DVC as SIGINT before it propagates.
    """
    argv = dvc_argv(args, executable, wait_for_lock)
    run = DvcRun(args=["dvc", *argv[len(argv) - len(args) - (1 if wait_for_lock else 0):]], returncode=-1)
    proc = subprocess.Popen(argv, cwd=str(cwd), env=dvc_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, encoding="utf-8", errors="replace", bufsize=1, start_new_session=True)
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:  # universal newlines: tqdm's "\r" frames arrive as separate lines
            line = raw.rstrip("\n")
            run.lines.append(line)
            if on_line is not None:
                on_line(line)
        run.returncode = proc.wait()
    except BaseException:
        _interrupt(proc, grace_s)
        raise
    if check and run.returncode != 0:
        raise DvcCommandError(run)
    return run


def dvc_json(args: Sequence[str], cwd: str | Path, *, executable: Optional[str] = None,
             env: Optional[Mapping[str, str]] = None) -> object:
    """Run a read-only `dvc ... --json` command and parse its stdout (stderr is kept apart for the error message)."""
    argv = dvc_argv([*args, "--json"], executable, wait_for_lock=True)
    proc = subprocess.run(argv, cwd=str(cwd), env=dvc_env(env), capture_output=True, text=True, encoding="utf-8",
                          errors="replace")
    run = DvcRun(args=["dvc", *args, "--json"], returncode=proc.returncode, lines=proc.stderr.splitlines())
    if proc.returncode != 0:
        raise DvcCommandError(run)
    try:
        return json.loads(proc.stdout or "{}")
    except json.JSONDecodeError:
        run.lines = (proc.stdout + proc.stderr).splitlines()
        raise DvcCommandError(run) from None


def status_in_process(cwd: str | Path) -> Optional[dict]:
    """What `dvc status --json` prints, from DVC's Python API in this process (no interpreter start, no second
    import of DVC: ~0.5 s less a call). None when it cannot answer here (e.g. another DVC process holds the repo
    lock; the CLI waits for it): the caller then asks the CLI, which also reports any real error."""
    try:
        from dvc.repo import Repo

        with Repo(str(cwd)) as repo:
            status = repo.status()
    except Exception:  # noqa: BLE001 - any failure here falls back to the CLI, which says what is wrong
        return None
    if not isinstance(status, dict):
        return None
    return {_address_from(cwd, key): value for key, value in status.items()}


def _address_from(root: str | Path, key: str) -> str:
    """DVC names a stage relative to the process's working directory (`../repo/dvc.yaml:raw_cots@violence` when
    this process runs elsewhere); the CLI run in `root` names it `raw_cots@violence`. Rename to the latter."""
    path, sep, name = key.rpartition(":")
    if not sep or not path.endswith("dvc.yaml"):
        return key
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root)).replace(os.sep, "/")
    return name if rel == "dvc.yaml" else f"{rel}:{name}"


def _interrupt(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGINT to DVC's process group (what Ctrl-C in a terminal does), then SIGTERM, then SIGKILL."""
    for sig, wait in ((signal.SIGINT, grace_s), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue


def is_progress_frame(line: str) -> bool:
    """A tqdm progress update that has not reached 100% (worth a debug line, not an info line)."""
    return bool(PROGRESS.search(line)) and "100%|" not in line
