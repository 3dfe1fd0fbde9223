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
    if work.exists() and (not fp_file.exists() or json.loads(fp_file.read_text()).get("fingerprint") != fp):
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
        if not path.exists():
            write_jsonl(path, process(i, shard))  # atomic: a kill mid-shard leaves no shard file
        rows.extend(read_jsonl(path))
    return rows
