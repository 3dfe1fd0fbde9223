"""Atomic file output and JSONL helpers: a reader never sees a half-written file, and a kill never leaves one behind."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, List, Sequence, Tuple

from .errors import PipelineError


@contextmanager
def atomic_path(dest: str | Path, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temp path beside `dest`; on success it replaces `dest` in one rename, on error it is removed."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # A SIGKILL skips the cleanup below and leaves the temp dir (or the moved-aside old dir) of that write beside
    # `dest`; remove such leftovers of earlier writes of this same destination before starting a new one.
    stale = re.compile(rf"\.{re.escape(dest.name)}\.(?:[a-z0-9_]{{8}}\.tmp|old)")
    for p in dest.parent.iterdir():
        if stale.fullmatch(p.name):
            shutil.rmtree(p, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    target = tmp if is_dir else tmp / dest.name
    try:
        yield target
        if is_dir:
            old = None
            if dest.exists():  # a rename cannot replace a non-empty directory: move the old one aside first
                old = dest.with_name(f".{dest.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(dest, old)
            os.replace(tmp, dest)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(target, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(dest: str | Path, text: str) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(dest: str | Path, obj: object) -> None:
    write_text(dest, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def write_jsonl(dest: str | Path, rows: Iterable[dict]) -> None:
    with atomic_path(dest) as tmp:
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def iter_jsonl(path: str | Path, what: str = "file") -> Iterator[Tuple[int, dict]]:
    """(line number, object) for each non-blank line; every problem is a one-line error naming file and line."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise PipelineError(f"{path}: {what} not found") from None
    except UnicodeDecodeError as e:
        raise PipelineError(f"{path}: not UTF-8 (byte {e.start})") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise PipelineError(f"{path}:{n}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise PipelineError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        yield n, row


def check_fields(where: str, row: dict, required: Sequence[str], optional: Sequence[str] = ()) -> None:
    """Missing or unknown keys of a JSONL row -> one-line error at `where` (file:line)."""
    missing = [k for k in required if k not in row]
    if missing:
        raise PipelineError(f"{where}: missing field(s) {', '.join(missing)}")
    unknown = sorted(set(row) - set(required) - set(optional))
    if unknown:
        allowed = ", ".join([*required, *optional])
        raise PipelineError(f"{where}: unknown field(s) {', '.join(unknown)} (allowed: {allowed})")


def read_jsonl(path: str | Path) -> List[dict]:
    """Read a produced JSONL file (an upstream stage's out)."""
    return [row for _, row in iter_jsonl(path, "file (run the upstream stage first)")]


def read_text(path: str | Path, what: str = "file") -> str:
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PipelineError(f"{path}: {what} not found") from None
    except UnicodeDecodeError as e:
        raise PipelineError(f"{path}: not UTF-8 (byte {e.start})") from None


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
