"""Metadata the Dagster UI renders: per materialization of a DVC stage item (read from its outs and dvc.lock after
`dvc repro`), and code references for the asset definitions.

What a materialization shows (only for files that exist):
- `dvc/item`, `dvc/reused` (DVC skipped the command: unchanged since dvc.lock, or restored from the run cache),
  `dvc/outs` (out md5s), `dvc/inputs` (dep md5s: the versions this artifact was built from), `dvc/params`;
- JSONL outs as tables, with Dagster's standard keys: `dagster/row_count` and `dagster/column_schema` (column names
  and types read with polars, every row considered), plus `rows` (and `rows/<file>` when there are several files);
- the numbers of metrics JSON files as plottable entries (`keep_rate`, `kept`, ...), `kept/total`, the whole file as
  `metrics`;
- `training_summary` (+ `seed`, `packages`) from a checkpoint directory's training_summary.json;
- markdown outs (a report, a card) as Markdown, a card's YAML front matter as JSON (`card`);
- images (the report's PNG plots) inline: Markdown with a `data:` URL, which the UI's Markdown renderer allows for
  images (1.13 widens its sanitizer's `src` protocols with `data`); images over MAX_INLINE_IMAGE bytes and plot data
  (csv/json/html) as paths.

`code_references(manifest, stage)` points an asset at the module its command runs (at `def main`) and at its
dvc.yaml entry, for the translator's definition metadata.
"""
from __future__ import annotations

import base64
import json
import re
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import dagster as dg

from .manifest import DvcManifest, DvcStage, StageItem

MAX_MARKDOWN = 20_000  # characters of a markdown out shown inline
MAX_INLINE_IMAGE = 1_500_000  # bytes of an image embedded in the event log (base64 adds a third)
IMAGE_TYPES = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
PLOT_SUFFIXES = {*IMAGE_TYPES, ".html", ".csv", ".tsv"}
SUMMARY_FILE = "training_summary.json"
ROW_COUNT, COLUMN_SCHEMA, CODE_REFERENCES = "dagster/row_count", "dagster/column_schema", "dagster/code_references"
_MODULE_CMD = re.compile(r"python\s+-m\s+([\w.]+)\s+(\w+)")


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


# ------------------------------------------------------------------------------------------------ tables
def table_metadata(files: List[Path], rel: Mapping[Path, str]) -> Dict[str, Any]:
    """Row count and column schema of JSONL files (one table: columns in first-seen order over the files).

    A file polars cannot read (a bad line: the stage's schema check names it) still counts its non-blank lines;
    only its columns are left out.
    """
    from pipelines.cards import read_table, type_name
    from pipelines.errors import PipelineError

    counts: Dict[str, int] = {}
    columns: Dict[str, List[str]] = {}
    for f in files:
        try:
            table = read_table(f)
        except PipelineError:
            counts[rel[f]] = _count_rows(f)
            continue
        counts[rel[f]] = table.rows
        for name, dtype in table.columns:
            types = columns.setdefault(name, [])
            if type_name(dtype) not in types:
                types.append(type_name(dtype))
    total = sum(counts.values())
    md: Dict[str, Any] = {"rows": total, ROW_COUNT: total}
    if len(counts) > 1:
        md.update({f"rows/{k}": v for k, v in counts.items()})
    if columns:
        md[COLUMN_SCHEMA] = dg.TableSchema(columns=[
            dg.TableColumn(name, " | ".join(types)) for name, types in columns.items()])
    return md


# ------------------------------------------------------------------------------------------------ markdown, images
def _front_matter(text: str) -> Tuple[Optional[Any], str]:
    """(parsed YAML front matter or None, body) of a markdown file such as a Hugging Face card."""
    from pipelines.errors import PipelineError
    from pipelines.model_card import split_front_matter

    try:
        front, body = split_front_matter(text)
    except PipelineError:
        return None, text
    return (front or None), body


def image_metadata(path: Path, label: str) -> Any:
    """An image inline (Markdown with a data: URL), or its path when it is too big to put in the event log."""
    data = path.read_bytes()
    if len(data) > MAX_INLINE_IMAGE:
        return dg.MetadataValue.path(str(path))
    encoded = base64.b64encode(data).decode("ascii")
    return dg.MetadataValue.md(f"![{label}](data:{IMAGE_TYPES[path.suffix.lower()]};base64,{encoded})")


# ------------------------------------------------------------------------------------------------ per materialization
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

    # ---------------------------------------------------------------- JSONL outs as tables
    jsonl = [f for f in files if f.suffix == ".jsonl"]
    if jsonl:
        md.update(table_metadata(jsonl, rel))

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

    # ---------------------------------------------------------------- markdown (cards: front matter apart)
    markdown = [f for f in files if f.suffix == ".md"][:3]
    for f in markdown:
        suffix = "" if len(markdown) == 1 else f"/{rel[f]}"
        front, body = _front_matter(f.read_text(encoding="utf-8", errors="replace"))
        md[f"markdown{suffix}"] = dg.MetadataValue.md(body[:MAX_MARKDOWN])
        if front is not None:
            md[f"card{suffix}"] = dg.MetadataValue.json(front)

    # ---------------------------------------------------------------- plots: images inline, data as paths
    plot_outs = {o.path for o in item.outs if o.plot}
    for f in files:
        if f.suffix.lower() in PLOT_SUFFIXES or any(rel[f] == p or rel[f].startswith(p + "/") for p in plot_outs):
            inline = f.suffix.lower() in IMAGE_TYPES
            md[f"plot/{rel[f]}"] = image_metadata(f, rel[f]) if inline else dg.MetadataValue.path(str(f))
    data_paths = [root / o.path for o in item.data_outs]
    if len(data_paths) == 1:
        md["path"] = dg.MetadataValue.path(str(data_paths[0]))
    return md


# ------------------------------------------------------------------------------------------------ definitions
def _line_of(path: Path, pattern: str) -> Optional[int]:
    """1-based number of the first line matching `pattern`, or None."""
    rx = re.compile(pattern)
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if rx.search(line):
            return n
    return None


def code_references(manifest: DvcManifest, stage: DvcStage) -> Dict[str, Any]:
    """`dagster/code_references` of a stage's asset: the module its command runs (`python -m pipelines raw_cots`
    -> pipelines/raw_cots.py, at `def main`) and the stage's entry in its dvc.yaml. Empty when neither is found."""
    root = manifest.root
    found: List[Tuple[Path, Optional[int], str]] = []
    m = _MODULE_CMD.search(stage.template_cmd)
    if m:
        module = root / m.group(1).replace(".", "/") / f"{m.group(2)}.py"
        if module.is_file():
            found.append((module, _line_of(module, r"^def main\b"),
                          f"{module.relative_to(root).as_posix()} (stage code)"))
    dvcfile = root / stage.items[0].dvcfile
    if dvcfile.is_file():
        found.append((dvcfile, _line_of(dvcfile, rf"^\s+{re.escape(stage.name)}:\s*(#.*)?$"),
                      f"{stage.items[0].dvcfile}: stage {stage.name}"))
    if not found:
        return {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.BetaWarning)  # code references are beta in Dagster 1.13
        refs = [dg.LocalFileCodeReference(file_path=str(p), line_number=n, label=label) for p, n, label in found]
        return {CODE_REFERENCES: dg.CodeReferencesMetadataValue(code_references=refs)}
