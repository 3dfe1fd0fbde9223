"""Materialization metadata of a DVC stage item, read from its outs and dvc.lock after `dvc repro`.

What appears (only for files that exist):
- `dvc/item`, `dvc/reused` (DVC skipped the command: unchanged since dvc.lock, or restored from the run cache),
  `dvc/outs` (out md5s), `dvc/inputs` (dep md5s: the versions this artifact was built from), `dvc/params`;
- `rows` of JSONL outs; the numbers of metrics JSON files as plottable entries (`keep_rate`, `kept`, ...),
  `kept/total`, and the whole file as `metrics`;
- `training_summary` (+ `seed`, `packages`) from a checkpoint directory's training_summary.json;
- markdown outs (a report, a spec chunk) as Markdown; plot files (png/svg/html/csv) as paths.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Mapping

import dagster as dg

from .manifest import DvcManifest, StageItem

MAX_MARKDOWN = 20_000  # characters of a markdown out shown inline
PLOT_SUFFIXES = {".png", ".svg", ".jpg", ".jpeg", ".html", ".csv", ".tsv"}
SUMMARY_FILE = "training_summary.json"


def _files(root: Path, item: StageItem, include_metrics: bool = True) -> List[Path]:
    out: List[Path] = []
    for o in item.outs if include_metrics else item.data_outs:
        p = root / o.path
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file()))
    return out


def _count_rows(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def _scalars(obj: Mapping[str, Any]) -> Dict[str, float | int]:
    return {k: v for k, v in obj.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def item_metadata(manifest: DvcManifest, item: StageItem, reused: bool) -> Dict[str, Any]:
    root = manifest.root
    md: Dict[str, Any] = {
        "dvc/item": item.name,
        "dvc/reused": reused,
        "dvc/outs": dg.MetadataValue.json(manifest.lock_outs(item.name)),
        "dvc/inputs": dg.MetadataValue.json(manifest.lock_deps(item.name)),
    }
    params = manifest.lock_params(item.name)
    if params:
        md["dvc/params"] = dg.MetadataValue.json(params)
    files = _files(root, item)
    rel = {f: f.relative_to(root).as_posix() for f in files}

    # ---------------------------------------------------------------- rows of JSONL outs
    jsonl = [f for f in files if f.suffix == ".jsonl"]
    if jsonl:
        counts = {rel[f]: _count_rows(f) for f in jsonl}
        md["rows"] = sum(counts.values())
        if len(counts) > 1:
            md.update({f"rows/{k}": v for k, v in counts.items()})

    # ---------------------------------------------------------------- metrics JSON
    metric_paths = [root / o.path for o in item.metric_outs if (root / o.path).is_file()]
    for p in metric_paths:
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        key = "metrics" if len(metric_paths) == 1 else f"metrics/{p.stem}"
        md[key] = dg.MetadataValue.json(data)
        if isinstance(data, Mapping):
            for k, v in _scalars(data).items():
                md.setdefault(k, v)
            total = data.get("samples", data.get("total"))
            if isinstance(data.get("kept"), int) and isinstance(total, int):
                md["kept/total"] = f"{data['kept']}/{total}"

    # ---------------------------------------------------------------- checkpoints: training summary
    for f in files:
        if f.name == SUMMARY_FILE:
            try:
                summary = json.loads(f.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            light = {k: v for k, v in summary.items() if k not in ("loss_curve", "reward_curve")}
            md["training_summary"] = dg.MetadataValue.json(light)
            if "seed" in summary:
                md["seed"] = summary["seed"]
            if isinstance(summary.get("packages"), Mapping):
                md["packages"] = dg.MetadataValue.json(summary["packages"])
            if isinstance(summary.get("metrics"), Mapping):
                for k, v in _scalars(summary["metrics"]).items():
                    md.setdefault(k, v)

    # ---------------------------------------------------------------- markdown and plots
    markdown = [f for f in files if f.suffix == ".md"][:3]
    for f in markdown:
        key = "markdown" if len(markdown) == 1 else f"markdown/{rel[f]}"
        md[key] = dg.MetadataValue.md(f.read_text(encoding="utf-8", errors="replace")[:MAX_MARKDOWN])
    plot_outs = {o.path for o in item.outs if o.plot}
    for f in files:
        if f.suffix in PLOT_SUFFIXES or any(rel[f] == p or rel[f].startswith(p + "/") for p in plot_outs):
            md[f"plot/{rel[f]}"] = dg.MetadataValue.path(str(f))
    data_paths = [root / o.path for o in item.data_outs]
    if len(data_paths) == 1:
        md["path"] = dg.MetadataValue.path(str(data_paths[0]))
    return md
