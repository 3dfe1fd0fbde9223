"""Resumable work in fixed shards: each finished shard is a file in a work dir, so a killed stage picks up where it
stopped and never redoes or duplicates a finished shard.

A fingerprint of everything that determines the results (inputs, params, model) guards the work dir: when it changes,
old shards are discarded instead of being mixed with new ones.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Callable, List, Sequence, TypeVar

from .errors import PipelineError
from .io import read_jsonl, write_json, write_jsonl

T = TypeVar("T")
log = logging.getLogger(__name__)


def fingerprint(*parts: object) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def run_sharded(
    work_dir: str | Path,
    fp: str,
    items: Sequence[T],
    shard_size: int,
    process: Callable[[int, List[T]], List[dict]],
    desc: str = "shards",
    progress: bool = True,
) -> List[dict]:
    """Process `items` in shards of `shard_size`, reusing shards already on disk; return all rows in order.

    `process(shard_index, shard_items)` returns the rows of one shard; it must depend only on its arguments
    (seed from the shard index), so a resumed run equals an uninterrupted one.
    """
    from tqdm.auto import tqdm

    work = Path(work_dir)
    fp_file = work / "fingerprint.json"
    if work.exists() and _stored_fingerprint(fp_file) != fp:
        log.info("%s: inputs or params changed, discarding old shards", work)
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    write_json(fp_file, {"fingerprint": fp})
    shards = [list(items[i:i + shard_size]) for i in range(0, len(items), shard_size)]
    done = sum((work / f"shard-{i:05d}.jsonl").exists() for i in range(len(shards)))
    if done:
        log.info("%s: resuming, %d of %d shards already done", work, done, len(shards))
    rows: List[dict] = []
    for i, shard in enumerate(tqdm(shards, desc=desc, unit="shard", disable=not progress)):
        path = work / f"shard-{i:05d}.jsonl"
        if path.exists():
            try:
                rows.extend(read_jsonl(path))
                continue
            except PipelineError as e:
                # The work dir is our own cache: a shard that cannot be read back (edited by hand, or written by an
                # older version) is recomputed, not reported as a problem of a file the user never made.
                log.warning("%s: unreadable shard recomputed (%s)", path, e)
                path.unlink()
        write_jsonl(path, process(i, shard))  # atomic: a kill mid-shard leaves no shard file
        rows.extend(read_jsonl(path))
    return rows


def _stored_fingerprint(fp_file: Path) -> str | None:
    """The fingerprint a work dir was made with; None when missing or unreadable (then the dir is discarded)."""
    try:
        return json.loads(fp_file.read_text(encoding="utf-8")).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None
