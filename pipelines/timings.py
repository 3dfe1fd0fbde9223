"""Wall-clock times of stage runs, kept out of every DVC out.

A time written inside a content-addressed output (a checkpoint's summary, a metrics file) makes two runs of the same
code on the same inputs differ, so a forced rerun changes the out's md5 and DVC reruns everything downstream. Stages
record their times here instead: one JSON file a stage under `<paths.work>/timings/` (git-ignored, not declared in
dvc.yaml, read by no stage), for the report reader, benchmarks and people.

    record("sft_checkpoint", "data/.work", train_s=201.4, wall_s=212.0)
    read_all("data/.work") -> {"sft_checkpoint": {"train_s": 201.4, "wall_s": 212.0, "finished": "..."}}
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict

from .io import write_json

DIR = "timings"


def path_for(stage: str, work: str | Path) -> Path:
    return Path(work) / DIR / f"{stage}.json"


def record(stage: str, work: str | Path, **values: Any) -> Dict[str, Any]:
    """Write the times of one run of `stage` (seconds, rounded to 0.1) and when it finished; returns what it wrote."""
    row = {k: (round(v, 1) if isinstance(v, float) else v) for k, v in values.items()}
    row["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_json(path_for(stage, work), row)
    return row


def read_all(work: str | Path) -> Dict[str, Dict[str, Any]]:
    """stage -> its last recorded times ({} when nothing was recorded; an unreadable file is skipped)."""
    out: Dict[str, Dict[str, Any]] = {}
    folder = Path(work) / DIR
    for f in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            out[f.stem] = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
    return out
