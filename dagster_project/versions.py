"""How DVC's records become Dagster versions. No Dagster import.

- data version of an item = the md5 dvc.lock records for its out (`45bd...` for a file, `7cd0....dir` for a directory).
  An item with several artifact outs gets a digest of the sorted `path=md5` pairs; metrics/plots outs (`cache: false`
  JSON, CSV) only count when the item has no other out.
- code version of a stage = a digest of its command template, the content of its code deps, and the current values of
  the params it declares. The template (`... --category ${item}`) is used, not the expanded commands, so adding a
  category does not make every other partition's code look changed. Data deps (spec files, upstream outs) are not
  code: Dagster tracks them through the upstream data versions instead.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

from .manifest import DvcManifest, DvcStage, StageItem

SKIP_DIRS = {"__pycache__", ".ipynb_checkpoints"}
CODE_SUFFIXES = {".py", ".sh", ".jinja", ".j2", ".sql", ".r", ".R"}


def default_is_code_dep(root: Path, path: str) -> bool:
    """A dep is code when it is a source file, or a directory that is a Python package (has `__init__.py`)."""
    p = root / path
    if p.is_dir():
        return (p / "__init__.py").is_file()
    return p.suffix in CODE_SUFFIXES


def _files(p: Path) -> Iterable[Path]:
    if p.is_file():
        yield p
    elif p.is_dir():
        for f in sorted(p.rglob("*")):
            if f.is_file() and not SKIP_DIRS.intersection(f.relative_to(p).parts) and f.suffix != ".pyc":
                yield f


def content_digest(root: Path, paths: Iterable[str]) -> str:
    """sha256 over (relative path, bytes) of every file under `paths`; a missing path hashes as missing."""
    h = hashlib.sha256()
    for rel in sorted(paths):
        p = root / rel
        if not p.exists():
            h.update(f"{rel}\0<missing>\0".encode())
            continue
        for f in _files(p):
            h.update(f.relative_to(root).as_posix().encode() + b"\0")
            h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def code_version(manifest: DvcManifest, stage: DvcStage,
                 is_code_dep: Optional[Callable[[Path, str], bool]] = None) -> str:
    """Digest of the stage's command template + code deps content + declared param values (16 hex chars)."""
    is_code = is_code_dep or default_is_code_dep
    code = [d for d in stage.deps if is_code(manifest.root, d)]
    payload = {
        "cmd": stage.template_cmd,
        "code": content_digest(manifest.root, code),
        "code_paths": sorted(code),
        "params": manifest.param_values(stage.name),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def data_version_from_lock(item: StageItem, lock_outs: Mapping[str, str]) -> Optional[str]:
    """The item's data version from dvc.lock out md5s, or None when the lock has no (complete) record of it."""
    outs = [o.path for o in item.data_outs]
    if not outs or any(not lock_outs.get(p) for p in outs):
        return None
    if len(outs) == 1:
        return lock_outs[outs[0]]
    joined = "\n".join(f"{p}={lock_outs[p]}" for p in sorted(outs))
    return hashlib.sha256(joined.encode()).hexdigest()[:32]


def data_version(manifest: DvcManifest, item: str) -> Optional[str]:
    return data_version_from_lock(manifest.items[item], manifest.lock_outs(item))


def stable_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)
