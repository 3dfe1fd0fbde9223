"""Shared helpers of the hostile-input tests (tests/test_hostile_*.py, issue 21), and checks that the helpers can fail.

Every class of bad input keeps one promise (README, RELIABILITY.md): the command exits 2 with exactly one `error:` line
that names the file / key / row at fault, prints no traceback, and writes nothing. `refused` checks that promise on a
CLI result; `snapshot` lists every file of a project (hidden ones too) so a test can assert nothing was written.

The CLI runs in-process (typer's CliRunner) so that a class can be tried with many generated inputs in a few seconds;
a few cases per class also go through a real `python -m pipelines` subprocess.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, Sequence

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def minimal_params(categories: Sequence[str] = ("violence",), **sections) -> dict:
    """A params.yaml for fast stage runs: the fake generator, 4 prompts in shards of 2; defaults for the rest."""
    p: dict = {
        "categories": list(categories),
        "raw_cots": {"generator": {"kind": "fake"}, "max_prompts": 4, "shard_size": 2},
    }
    p.update(sections)
    return p


def make_project(tmp: Path, params: dict | None = None) -> Path:
    """A project dir with the human-edited inputs (data/spec, data/prompts, data/evals) and a params.yaml."""
    for sub in ("data/spec", "data/prompts"):
        shutil.copytree(ROOT / sub, tmp / sub)
    (tmp / "data/evals").mkdir(parents=True, exist_ok=True)
    (tmp / "params.yaml").write_text(yaml.safe_dump(params or minimal_params(), sort_keys=False))
    return tmp


def snapshot(root: Path) -> Dict[str, str]:
    """{relative path: sha256} of every file and directory under `root` (hidden ones included)."""
    out: Dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = "dir"
        for f in filenames:
            p = Path(dirpath) / f
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "special"
    return out


@contextlib.contextmanager
def cwd(path: Path) -> Iterator[None]:
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


class CliResult:
    def __init__(self, code: int, stdout: str, stderr: str, exception: BaseException | None = None) -> None:
        self.code, self.stdout, self.stderr, self.exception = code, stdout, stderr, exception

    def __repr__(self) -> str:
        return f"CliResult(code={self.code}, stderr={self.stderr[-800:]!r}, exception={self.exception!r})"


def run_cli(*args: str, project: Path) -> CliResult:
    """`python -m pipelines <args>` in-process with `project` as the working directory."""
    from typer.testing import CliRunner

    from pipelines.cli import app

    # The CLI calls logging.basicConfig; give the root logger a handler first so stage logs never land in the
    # runner's captured (and later closed) stderr: the error line must be the only thing there.
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.NullHandler())
    with cwd(project):
        r = CliRunner().invoke(app, list(args), catch_exceptions=True)
    exc = r.exception if r.exception is not None and not isinstance(r.exception, SystemExit) else None
    return CliResult(r.exit_code, r.stdout, r.stderr, exc)


def run_cli_subprocess(*args: str, project: Path, env: dict | None = None, timeout: float = 120) -> CliResult:
    """The real thing: a `python -m pipelines` subprocess, as dvc.yaml runs it."""
    e = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    p = subprocess.run([sys.executable, "-m", "pipelines", *args], cwd=project, env=e, capture_output=True,
                       text=True, timeout=timeout)
    return CliResult(p.returncode, p.stdout, p.stderr)


def one_line_error(stderr: str) -> str:
    """The single `error:` line of stderr; fails when there is a traceback or more than one line."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert "Traceback" not in stderr, stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-2000:]
    return lines[0]


def refused(result: CliResult, *words: str) -> str:
    """Assert the promise on a CLI result: exit 2, one `error:` line containing every word, no traceback."""
    assert result.exception is None, f"uncaught {result.exception!r}"
    assert result.code == 2, result
    line = one_line_error(result.stderr)
    for w in words:
        assert w in line, f"{w!r} not in {line!r}"
    return line


def assert_one_line(message: str, *words: str) -> None:
    """A PipelineError message: one line, naming every word."""
    assert "\n" not in message and "\r" not in message, repr(message)
    for w in words:
        assert w in message, f"{w!r} not in {message!r}"


# ---------------------------------------------------------------------------- the helpers can fail
def test_helpers_detect_a_write_a_traceback_and_a_second_line(tmp_path):
    (tmp_path / "a").write_text("x")
    before = snapshot(tmp_path)
    (tmp_path / ".hidden.tmp").mkdir()
    assert snapshot(tmp_path) != before
    for stderr in ("Traceback (most recent call last):\nerror: x", "error: a\nerror: b", "oops"):
        try:
            one_line_error(stderr)
        except AssertionError:
            continue
        raise AssertionError(f"accepted {stderr!r}")
    assert one_line_error("\nerror: fine\n") == "error: fine"
