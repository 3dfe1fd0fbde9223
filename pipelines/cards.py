"""Cards: a Hugging Face dataset card per dataset stage and a model card per evaluated model, lineage from dvc.lock.

    python -m pipelines cards                # data/cards/datasets/<stage>/README.md + card.json (raw_cots, ...)
    python -m pipelines cards --model sft    # data/cards/models/sft/README.md + card.json

Two dvc.yaml stages run it: `cards` (the dataset cards) and `model_cards` (one item per eval_scores.models key). Each
reads only what its cards describe - the dataset files and their metrics; one checkpoint directory and its evaluation
metrics - plus dvc.lock, which no stage can depend on. So in the Dagster graph a card hangs off its own artifacts
(datasets -> cards; checkpoint + eval_scores -> model_cards) instead of one node fed by every stage.

A dataset card (README.md front matter: `configs`, `dataset_info` with features and row counts, `size_categories`,
`tags`) lists every file with its md5 as dvc.lock records it (checked against the bytes), its rows and columns (read
with polars), the stage's metrics, params and inputs, the spec chunks it descends from and the seeds upstream.

A model card starts from the README.md the training stage wrote inside the checkpoint (pipelines/model_card.py:
base model, training data md5s, spec hash, params) and adds, in the cards stage's own output only, the evaluation
results with 95% intervals (`model-index` in the front matter and a table) and the dvc.lock lineage.

Every card also has a `card.json`, the complete record: outs, metrics, params, deps with the stage that produced each,
the whole upstream lineage recursively (each stage's deps, outs, params), spec chunk md5s, seeds, git commit (dirty
paths not counting dvc.lock and stage outputs, which the run itself rewrites) and installed package versions.
"""
from __future__ import annotations

import hashlib
import json
import logging
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import yaml

from . import catalog
from .errors import PipelineError
from .io import atomic_path, iter_jsonl, read_bytes, read_text
from .model_card import dvc_md5, md5_file, read_card, render

log = logging.getLogger("cards")

# ---------------------------------------------------------------------------- what gets a card
DATASET_STAGES = ("raw_cots", "judged_cots", "sft_dataset")
SPEC_STAGE = "spec_chunks"  # its outs are spec(category) texts, one item per category
EVAL_STAGE = "eval_scores"  # eval_scores@<model>: its metrics join the card of that model
PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "safetensors", "polars", "dvc", "dvclive",
            "dagster", "pydantic", "deliberative-factory")
DESCRIPTIONS = {
    "raw_cots": "Generated samples per prompt: chain of thought and answer, written with the category's spec in "
                "context, plus the parse flags of each sample.",
    "judged_cots": "Every raw sample with the spec-aware judge's scores (k samples, minimum kept), rationale and "
                   "the kept flag.",
    "sft_dataset": "Spec-free chat examples built from the kept samples (system prompt without the spec, user "
                   "prompt, assistant chain of thought + answer): what SFT trains on.",
}
LOCK = Path("dvc.lock")
DVC_YAML = Path("dvc.yaml")
CARD_VERSION = 2


# ---------------------------------------------------------------------------- small helpers
def split_key(key: str) -> Tuple[str, Optional[str]]:
    """`judged_cots@violence` -> ("judged_cots", "violence"); `sft_dataset` -> ("sft_dataset", None)."""
    stage, _, item = key.partition("@")
    return stage, (item or None)


def _covers(a: str, b: str) -> bool:
    """True when paths a and b are the same, or one lies inside the other (a dir dep on a file out, or vice versa)."""
    a, b = a.rstrip("/"), b.rstrip("/")
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def _entry(e: Mapping[str, Any]) -> dict:
    """A dep/out of dvc.lock reduced to what identifies its version."""
    out = {"path": e["path"], "md5": e.get("md5")}
    for k in ("size", "nfiles"):
        if e.get(k) is not None:
            out[k] = e[k]
    return out


def metrics_paths(dvc_yaml: Mapping[str, Any], lock_keys: Iterable[str]) -> Dict[str, set]:
    """{lock key: paths dvc.yaml declares as metrics for that stage}, `${item}`/`${key}` filled in for foreach items.

    dvc.lock does not say which outs are metrics, so this reads dvc.yaml. Top-level `metrics:` paths count for
    every stage that has them as an out.
    """
    stages = dvc_yaml.get("stages") or {}
    top = {m if isinstance(m, str) else next(iter(m)) for m in dvc_yaml.get("metrics") or []}
    result = {}
    for key in lock_keys:
        name, item = split_key(key)
        spec = stages.get(name) or {}
        body = spec.get("do", spec) if "foreach" in spec else spec
        paths = set(top)
        for m in body.get("metrics") or []:
            p = m if isinstance(m, str) else next(iter(m))
            if item is not None:
                p = p.replace("${item}", item).replace("${key}", item)
            paths.add(p)
        result[key] = paths
    return result


def flatten_params(params: Mapping[str, Any]) -> Dict[str, Any]:
    """dvc.lock `params: {params.yaml: {raw_cots: {sampling: {seed: 0}}}}` -> {"raw_cots.sampling.seed": 0}."""
    flat: Dict[str, Any] = {}

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, Mapping) and v:
            for k, sub in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), sub)
        else:
            flat[prefix] = v

    for per_file in (params or {}).values():
        walk("", per_file)
    return flat


def find_seeds(params: Mapping[str, Any]) -> Dict[str, Any]:
    """Seeds among dvc.lock params: every key named `seed` or ending in `_seed`."""
    return {k: v for k, v in flatten_params(params).items()
            if k.rsplit(".", 1)[-1] == "seed" or k.rsplit(".", 1)[-1].endswith("_seed")}


def _short(v: Any, width: int = 80) -> str:
    text = json.dumps(v, ensure_ascii=False) if not isinstance(v, str) else v
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join("" if c is None else str(c) for c in r) + " |" for r in rows]


# ---------------------------------------------------------------------------- lineage
def producers(lock_stages: Mapping[str, Any]) -> Dict[str, Dict[str, List[str]]]:
    """{stage key: {dep path: [keys of the stages whose outs produce it]}} over every stage in dvc.lock."""
    outs = [(k, o["path"]) for k, s in lock_stages.items() for o in s.get("outs") or []]
    return {
        key: {d["path"]: sorted({k for k, p in outs if k != key and _covers(d["path"], p)})
              for d in s.get("deps") or []}
        for key, s in lock_stages.items()
    }


def upstream(key: str, prod: Mapping[str, Mapping[str, List[str]]]) -> List[str]:
    """Every stage that `key` depends on, directly or not, upstream first (a topological order); not `key` itself."""
    order: List[str] = []
    seen = {key}

    def visit(k: str) -> None:
        for ups in prod.get(k, {}).values():
            for u in ups:
                if u not in seen:
                    seen.add(u)
                    visit(u)
                    order.append(u)

    visit(key)
    return order


def quoted_json(path: str, md5: Optional[str], files: Mapping[str, bytes]) -> Any:
    """The parsed JSON of a small file the card quotes; its bytes must hash to dvc.lock's md5."""
    if path not in files:
        raise PipelineError(f"{path}: listed in dvc.lock but not found (run `dvc checkout` or `dvc repro`)")
    data = files[path]
    got = hashlib.md5(data).hexdigest()
    if md5 is not None and got != md5:
        raise PipelineError(f"{path}: md5 {got} differs from dvc.lock ({md5}); "
                            "run `dvc repro` (or `dvc checkout`) so the workspace matches dvc.lock")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PipelineError(f"{path}: metrics file is not JSON ({e})") from None


def build_card(key: str, lock: Mapping[str, Any], *, metrics: Mapping[str, set], files: Mapping[str, bytes],
               code: Mapping[str, Any], packages: Mapping[str, Optional[str]], quote_metrics: bool = True) -> dict:
    """The lineage record of one dvc.lock stage. Pure: everything it needs is passed in.

    Args:
        key: stage key in dvc.lock (`sft_dataset`, `judged_cots@violence`).
        lock: parsed dvc.lock.
        metrics: {stage key: paths declared as metrics in dvc.yaml} (see `metrics_paths`).
        files: contents of the stage's metrics files, by path (every one must be there when `quote_metrics`).
        code: {"git_commit", "dirty", "dirty_paths"}.
        packages: {distribution name: version or None}.
        quote_metrics: False lists the metrics files by md5 with `values: None` (files not read by the caller).

    Returns:
        The record as a JSON-ready dict; `outs[*].md5` are exactly dvc.lock's.

    Raises:
        PipelineError: no such stage, a metrics file is missing, differs from dvc.lock or is not JSON.
    """
    stages = lock.get("stages") or {}
    if key not in stages:
        raise PipelineError(f"dvc.lock: no stage {key!r} (run `dvc repro {key}` first)")
    prod = producers(stages)
    s = stages[key]
    name, item = split_key(key)
    ups = upstream(key, prod)

    outs, own_metrics = [], {}
    for o in s.get("outs") or []:
        if o["path"] in metrics.get(key, set()):
            values = quoted_json(o["path"], o.get("md5"), files) if quote_metrics else None
            own_metrics[o["path"]] = {"md5": o.get("md5"), "values": values}
        else:
            outs.append(_entry(o))

    def deps_of(k: str) -> List[dict]:
        return [{**_entry(d), "produced_by": prod[k][d["path"]]} for d in stages[k].get("deps") or []]

    # Spec: every spec_chunks item in the lineage, as dvc.lock records it (one per category).
    spec = {}
    for k in [key, *ups]:
        st, cat = split_key(k)
        if st == SPEC_STAGE:
            for o in stages[k].get("outs") or []:
                spec[cat or o["path"]] = {"path": o["path"], "md5": o.get("md5")}

    seeds: Dict[str, Any] = {}
    for k in [*ups, key]:
        seeds.update(find_seeds(stages[k].get("params") or {}))

    return {
        "card_version": CARD_VERSION,
        "card": key,
        "stage": name,
        "item": item,
        "cmd": s.get("cmd"),
        "outs": outs,
        "metrics": own_metrics,
        "params": s.get("params") or {},
        "deps": deps_of(key),
        "spec": dict(sorted(spec.items())),
        "seeds": seeds,
        "upstream": [{"stage": k, "cmd": stages[k].get("cmd"), "outs": [_entry(o) for o in stages[k].get("outs") or []],
                      "params": stages[k].get("params") or {}, "deps": deps_of(k)} for k in ups],
        "code": dict(code),
        "packages": dict(packages),
    }


def source_state(code: Mapping[str, Any], lock: Mapping[str, Any]) -> dict:
    """`code` with dvc.lock and the stages' own outputs dropped from the dirty paths.

    A `dvc repro` rewrites dvc.lock and the git-tracked (cache: false) metrics before the cards run, so they are
    always "modified" at that point; what tells whether the run matches its commit is the rest (code, spec, params).
    """
    outs = [o["path"] for s in (lock.get("stages") or {}).values() for o in s.get("outs") or []]
    if code.get("dirty") is None:
        return dict(code)
    paths = [p for p in code.get("dirty_paths") or []
             if Path(p).name != "dvc.lock" and not any(_covers(p, o) for o in outs)]
    return {**code, "dirty": bool(paths), "dirty_paths": paths}


def lineage_markdown(card: Mapping[str, Any], level: int = 2) -> List[str]:
    """The lineage record as markdown sections (headings at `level`): outputs, metrics, spec, params, seeds, inputs,
    upstream stages, code. The card.json next to it is the complete record."""
    h = "#" * level
    c, code = card, card["code"]
    lines = [f"{h} Outputs (dvc.lock)", ""]
    lines += _table(["path", "md5", "size (bytes)", "files"],
                    [[f"`{o['path']}`", f"`{o['md5']}`", o.get("size", ""), o.get("nfiles", 1)] for o in c["outs"]])
    if c["metrics"]:
        lines += ["", f"{h} Metrics", ""]
        lines += [f"- `{p}` (md5 `{m['md5']}`)" + (f": {_short(m['values'], 300)}" if m["values"] is not None else "")
                  for p, m in c["metrics"].items()]
    if c["spec"]:
        lines += ["", f"{h} Spec (dvc.lock)", ""]
        lines += _table(["category", "spec chunk", "md5"],
                        [[cat, f"`{s['path']}`", f"`{s['md5']}`"] for cat, s in c["spec"].items()])
    lines += ["", f"{h} Parameters (dvc.lock)", ""]
    lines += [f"- `{k}`: {_short(v)}" for k, v in flatten_params(c["params"]).items()] or ["(none)"]
    lines += ["", f"{h} Seeds", ""]
    lines += [f"- `{k}`: {v}" for k, v in c["seeds"].items()] or ["(none found in the lineage's params)"]
    lines += ["", f"{h} Inputs", ""]
    lines += _table(["path", "md5", "produced by"],
                    [[f"`{d['path']}`", f"`{d['md5']}`", ", ".join(d["produced_by"]) or "(source)"] for d in c["deps"]])
    lines += ["", f"{h} Upstream lineage", ""]
    if c["upstream"]:
        rows = [[u["stage"], "<br>".join(f"`{o['path']}` `{o['md5']}`" for o in u["outs"]),
                 _short(", ".join(f"`{k}`" for k in flatten_params(u["params"])) or "-", 200)] for u in c["upstream"]]
        lines += _table(["stage", "outputs (md5)", "params"], rows)
    else:
        lines.append("(none: built from source files only)")
    dirty = "unknown" if code.get("dirty") is None else ("yes: " + ", ".join(code.get("dirty_paths") or [])
                                                          if code["dirty"] else "no")
    lines += ["", f"{h} Code and environment", "", f"- git commit: `{code.get('git_commit')}`",
              f"- uncommitted changes to tracked files (besides dvc.lock and stage outputs): {dirty}",
              "- packages: " + ", ".join(f"{k} {v or '(not installed)'}" for k, v in c["packages"].items())]
    return lines


# ---------------------------------------------------------------------------- tables (polars)
@dataclass(frozen=True)
class Table:
    """Rows and columns of one JSONL file; `columns` are (name, polars dtype) in file order."""

    path: str
    rows: int
    bytes: int
    md5: str
    columns: Tuple[Tuple[str, Any], ...]


def read_table(path: str | Path) -> Table:
    """Row count and column types of a JSONL file, every row read (polars infers a type that fits all of them).

    Raises:
        PipelineError: the file is missing or a line is not a JSON object (naming file and line).
    """
    import polars as pl

    path = Path(path)
    if not path.is_file():
        read_bytes(path, "dataset file")  # the one-line error: missing, a directory, unreadable
    size, md5 = path.stat().st_size, md5_file(path)
    with path.open("rb") as f:
        if not any(line.strip() for line in f):
            return Table(path.as_posix(), 0, size, md5, ())
    frame = pl.scan_ndjson(path, infer_schema_length=None)
    try:
        schema = frame.collect_schema()
        rows = frame.select(pl.len()).collect().item()
    except pl.exceptions.PolarsError as e:
        for _ in iter_jsonl(path, "dataset file"):  # names the first bad line
            pass
        raise PipelineError(f"{path}: not readable as JSONL ({str(e).splitlines()[0]})") from None
    return Table(path.as_posix(), int(rows), size, md5, tuple(schema.items()))


def type_name(dtype: Any) -> str:
    """A short type string: string, int64, float64, bool, null, list<...>, struct<name: type, ...>."""
    import polars as pl

    if isinstance(dtype, (pl.List, pl.Array)):
        return f"list<{type_name(dtype.inner)}>"
    if isinstance(dtype, pl.Struct):
        return "struct<" + ", ".join(f"{f.name}: {type_name(f.dtype)}" for f in dtype.fields) + ">"
    name = str(dtype).lower()
    return {"boolean": "bool", "utf8": "string"}.get(name, name)


def hf_feature(name: str, dtype: Any) -> dict:
    """A column as the `dataset_info.features` entry of a Hugging Face dataset card."""
    import polars as pl

    if isinstance(dtype, (pl.List, pl.Array)):
        inner = dtype.inner
        if isinstance(inner, pl.Struct):
            return {"name": name, "list": [hf_feature(f.name, f.dtype) for f in inner.fields]}
        return {"name": name, "sequence": type_name(inner)}
    if isinstance(dtype, pl.Struct):
        return {"name": name, "struct": [hf_feature(f.name, f.dtype) for f in dtype.fields]}
    return {"name": name, "dtype": type_name(dtype)}


def size_category(rows: int) -> str:
    """The Hub's `size_categories` bucket for a row count."""
    bounds = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
              (10_000_000, "1M<n<10M")]
    return next((label for bound, label in bounds if rows < bound), "n>10M")


# ---------------------------------------------------------------------------- dataset cards
def data_files(out: Mapping[str, Any], root: Path = Path(".")) -> List[Path]:
    """The JSONL files of one dvc.lock data out, after checking the out's bytes hash to dvc.lock's md5."""
    path = root / out["path"]
    if not path.exists():
        raise PipelineError(f"{out['path']}: listed in dvc.lock but not found (run `dvc checkout` or `dvc repro`)")
    got = dvc_md5(path)
    if out.get("md5") is not None and got != out["md5"]:
        raise PipelineError(f"{out['path']}: md5 {got} differs from dvc.lock ({out['md5']}); "
                            "run `dvc repro` (or `dvc checkout`) so the workspace matches dvc.lock")
    files = [path] if path.is_file() else sorted(path.rglob("*.jsonl"))
    return [f for f in files if f.suffix == ".jsonl"]


def _split(path: str) -> str:
    stem = Path(path).stem
    return stem if stem in ("train", "validation", "test") else "train"


def dataset_card(stage: str, records: Mapping[str, dict], tables: Mapping[str, Sequence[Table]],
                 description: str = "") -> Tuple[str, dict]:
    """(README text, card.json record) of one dataset stage from its items' lineage records and tables.

    Args:
        stage: the dvc.yaml stage (`raw_cots`).
        records: {stage key: `build_card` record}, one per item (`raw_cots@violence`) in dvc.lock order.
        tables: {stage key: the JSONL tables of that item's outs}.
        description: a paragraph under the title.
    """
    configs, infos, file_rows, columns = [], [], [], {}
    for key, tabs in tables.items():
        item = split_key(key)[1] or "default"
        for t in tabs:
            name = item if len(tabs) == 1 else f"{item}-{Path(t.path).stem}"
            configs.append({"config_name": name, "data_files": [{"split": _split(t.path), "path": t.path}]})
            infos.append({"config_name": name, "features": [hf_feature(n, d) for n, d in t.columns],
                          "splits": [{"name": _split(t.path), "num_bytes": t.bytes, "num_examples": t.rows}]})
            file_rows.append([name, f"`{t.path}`", t.rows, t.bytes, f"`{t.md5}`"])
            for n, d in t.columns:
                columns.setdefault(n, type_name(d))
    total = sum(t.rows for tabs in tables.values() for t in tabs)
    front = {"pretty_name": stage, "tags": ["deliberative-alignment", "safety", "chain-of-thought", "synthetic"],
             "task_categories": ["text-generation"], "size_categories": [size_category(total)],
             "configs": configs, "dataset_info": infos}

    lines = [f"# {stage}", ""]
    lines += [description, ""] if description else []
    items = [split_key(k)[1] for k in records if split_key(k)[1]]
    lines += [f"Written by the `{stage}` stage" + (f", one item per key ({', '.join(items)})" if items else "")
              + ". Every file was checked against the md5 dvc.lock records for it when this card was written.", ""]
    lines += ["## Files", ""] + _table(["config", "file", "rows", "bytes", "md5"], file_rows)
    lines += ["", "## Columns", ""] + _table(["column", "type"], [[f"`{n}`", f"`{t}`"] for n, t in columns.items()])
    for key, rec in records.items():
        lines += ["", f"## Lineage of `{key}`", ""] + lineage_markdown(rec, level=3)
    record = {"card_version": CARD_VERSION, "dataset": stage, "rows": total,
              "tables": {t.path: {"rows": t.rows, "bytes": t.bytes, "md5": t.md5,
                                  "columns": {n: type_name(d) for n, d in t.columns}}
                         for tabs in tables.values() for t in tabs},
              "items": dict(records)}
    return render(front, "\n".join(lines)), record


# ---------------------------------------------------------------------------- model cards
def eval_rows(values: Mapping[str, Any]) -> List[dict]:
    """Every metric of an eval metrics file that has a 95% interval: {"metric", "value", "ci95", "n"}, file order."""
    rows = []
    for k, v in values.items():
        ci = values.get(f"{k}_ci95")
        if isinstance(v, (int, float)) and not isinstance(v, bool) and isinstance(ci, list) and len(ci) == 2:
            rows.append({"metric": k, "value": v, "ci95": ci, "n": values.get(f"{k}_n")})
    return rows


def _interval(ci: Sequence[Any]) -> str:
    return "[" + ", ".join("n/a" if x is None else f"{x:.3f}" for x in ci) + "]"


def model_index(name: str, eval_key: str, rows: Sequence[Mapping[str, Any]]) -> List[dict]:
    """The Hub's `model-index` front matter: one result of the project's safety evaluation, each metric's 95%
    interval and item count spelled out in its display name (the format has no field for an interval)."""
    metrics = [{"type": r["metric"], "value": r["value"],
                "name": f"{r['metric']} (95% CI {_interval(r['ci95'])}" + (f", n={r['n']})" if r["n"] is not None
                                                                           else ")"),
                "verified": False} for r in rows]
    return [{"name": name, "results": [{"task": {"type": "text-generation", "name": "Safety evaluation"},
                                        "dataset": {"name": f"{eval_key} eval sets (data/evals)",
                                                    "type": "deliberative-factory-evals"},
                                        "metrics": metrics}]}]


def compose_model_card(key: str, record: Optional[dict], eval_key: str, eval_md5: Optional[str],
                       eval_values: Mapping[str, Any], checkpoint_card: Optional[Tuple[Dict[str, Any], str]],
                       training: Optional[Mapping[str, Any]] = None, source: Optional[Mapping[str, Any]] = None,
                       evaluated: Optional[Mapping[str, Any]] = None) -> Tuple[str, dict]:
    """(README text, card.json record) of the model `key`: the checkpoint's own card plus evaluation and lineage.

    Args:
        key: the eval_scores.models key (`sft`).
        record: `build_card` record of the stage that produced the checkpoint; None for a model directory no stage
            produces (a path given in eval_scores.models).
        eval_key / eval_md5 / eval_values: the eval stage key, its metrics file's md5 (dvc.lock) and parsed values.
        checkpoint_card: (front matter, body) of the checkpoint's README.md, or None when it has none.
        training: the `metrics` of the checkpoint's training_summary.json, when there is one.
        source: the checkpoint's source.json (where the base_model stage took the weights from), when there is one.
        evaluated: {"path", "md5"} of the model directory as the eval stage's dvc.lock entry records it.
    """
    name = record["stage"] if record else key
    front, body = checkpoint_card or ({}, "")
    front = dict(front) or {"model_name": name, "library_name": "transformers", "pipeline_tag": "text-generation",
                            "tags": ["deliberative-alignment", "safety"]}
    rows = eval_rows(eval_values)
    front["model-index"] = model_index(str(front.get("model_name") or name), eval_key, rows)

    lines = [body.rstrip()] if body.strip() else [
        f"# {name}", "", "The checkpoint has no README.md of its own; what follows comes from dvc.lock and the "
        "evaluation."]
    lines += ["", f"## Evaluation (`{eval_key}`)", ""]
    if evaluated:
        lines += [f"Evaluated `{evaluated['path']}`, md5 `{evaluated.get('md5')}` (dvc.lock)."]
    lines += [f"Metrics file md5 `{eval_md5}` (dvc.lock). 95% intervals: Wilson for shares, bootstrap over prompts "
              "for means and goodness@q; n = items (prompts for bootstrapped metrics).", ""]
    lines += _table(["metric", "value", "95% interval", "n"],
                    [[r["metric"], f"{r['value']:.3f}", _interval(r["ci95"]), r["n"]] for r in rows])
    if source:
        lines += ["", "## Source (source.json)", ""] + [f"- `{k}`: {_short(v, 200)}" for k, v in source.items()]
    if training:
        lines += ["", "## Training metrics (training_summary.json)", ""]
        lines += [f"- `{k}`: {_short(v)}" for k, v in training.items()]
    if record:
        lines += ["", f"## Lineage of `{record['card']}` (dvc.lock)", ""] + lineage_markdown(record, level=3)
    else:
        lines += ["", "## Lineage", "", "No stage of this pipeline produces this model directory: it is an input, "
                  "known by the md5 above."]
    full = {"card_version": CARD_VERSION, "model": key, "evaluated": dict(evaluated or {}), "checkpoint": record,
            "eval": {"stage": eval_key, "md5": eval_md5, "metrics": rows, "values": dict(eval_values)},
            "training_metrics": dict(training or {}), "source": dict(source or {}), "front_matter": front}
    return render(front, "\n".join(lines)), full


def checkpoint_stage(lock: Mapping[str, Any], model_dir: str) -> Optional[str]:
    """The dvc.lock stage whose out is `model_dir`, or None (a model directory given as an input)."""
    for k, s in (lock.get("stages") or {}).items():
        if any(o["path"].rstrip("/") == model_dir.rstrip("/") for o in s.get("outs") or []):
            return k
    return None


# ---------------------------------------------------------------------------- I/O
def git_state(cwd: Path = Path(".")) -> dict:
    """Commit of HEAD and whether tracked files differ from it (untracked files are ignored)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return {"git_commit": None, "dirty": None, "dirty_paths": []}
    paths = sorted(line[3:] for line in status.stdout.splitlines() if line.strip())
    return {"git_commit": commit.stdout.strip(), "dirty": bool(paths), "dirty_paths": paths}


def package_versions(names: Iterable[str] = PACKAGES) -> Dict[str, Optional[str]]:
    """Installed versions by distribution name (read from metadata; nothing is imported)."""
    out: Dict[str, Optional[str]] = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def _load_yaml(path: Path, what: str) -> dict:
    try:
        data = yaml.safe_load(read_text(path, what))
    except yaml.YAMLError as e:
        raise PipelineError(f"{path}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: expected a mapping at the top level")
    return data


def _json_in(path: Path) -> Optional[dict]:
    """A JSON object file inside a checkpoint, or None when the checkpoint has no such file."""
    if not path.is_file():
        return None
    try:
        data = json.loads(read_text(path, "checkpoint file"))
    except json.JSONDecodeError as e:
        raise PipelineError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: expected a JSON object")
    return data


def _write_card_dir(dest: Path, readme: str, record: dict) -> None:
    """README.md and card.json, swapped in together."""
    with atomic_path(dest, is_dir=True) as tmp:
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "README.md").write_text(readme, encoding="utf-8")
        (tmp / "card.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _metric_files(keys: Iterable[str], lock: Mapping[str, Any], mets: Mapping[str, set]) -> Dict[str, bytes]:
    stages = lock.get("stages") or {}
    return {o["path"]: read_bytes(o["path"], "metrics file (run `dvc repro` first)")
            for k in keys for o in stages[k].get("outs") or [] if o["path"] in mets[k]}


def write_dataset_cards(lock: Mapping[str, Any], dvc_yaml: Mapping[str, Any], out_dir: Path,
                        code: Mapping[str, Any], packages: Mapping[str, Optional[str]]) -> Dict[str, dict]:
    """data/cards/datasets/<stage>/ for every stage of DATASET_STAGES in dvc.lock (the folder replaced as a whole)."""
    stages = lock.get("stages") or {}
    by_stage = {s: [k for k in stages if split_key(k)[0] == s] for s in DATASET_STAGES}
    by_stage = {s: keys for s, keys in by_stage.items() if keys}
    if not by_stage:
        raise PipelineError(f"dvc.lock: none of the stages {', '.join(DATASET_STAGES)} has run yet; nothing to card")
    mets = metrics_paths(dvc_yaml, stages.keys())
    code = source_state(code, lock)
    descriptions = {**DESCRIPTIONS, **{n: (s.get("do", s).get("desc") or DESCRIPTIONS.get(n, ""))
                                       for n, s in (dvc_yaml.get("stages") or {}).items() if isinstance(s, dict)}}
    cards = {}
    with atomic_path(out_dir, is_dir=True) as tmp:
        tmp.mkdir(parents=True, exist_ok=True)
        for stage, keys in by_stage.items():
            files = _metric_files(keys, lock, mets)
            records = {k: build_card(k, lock, metrics=mets, files=files, code=code, packages=packages) for k in keys}
            tables = {k: [read_table(f) for o in stages[k].get("outs") or [] if o["path"] not in mets[k]
                          for f in data_files(o)] for k in keys}
            readme, record = dataset_card(stage, records, tables, descriptions.get(stage, ""))
            (tmp / stage).mkdir()
            (tmp / stage / "README.md").write_text(readme, encoding="utf-8")
            (tmp / stage / "card.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")
            cards[stage] = record
    log.info("%d dataset cards -> %s/ (%s)", len(cards), out_dir, ", ".join(cards))
    return cards


def write_model_card_dir(key: str, model_dir: str, lock: Mapping[str, Any], dvc_yaml: Mapping[str, Any],
                         out_dir: Path, code: Mapping[str, Any], packages: Mapping[str, Optional[str]]) -> dict:
    """data/cards/models/<key>/: the checkpoint's card + its evaluation + lineage. Reads the checkpoint directory's
    README.md and training_summary.json and the eval metrics file; writes only `out_dir`."""
    stages = lock.get("stages") or {}
    ckpt = checkpoint_stage(lock, model_dir)
    eval_key = f"{EVAL_STAGE}@{key}"
    if eval_key not in stages:
        raise PipelineError(f"dvc.lock: no stage {eval_key!r} (run `dvc repro {eval_key}` first)")
    mets = metrics_paths(dvc_yaml, stages.keys())
    eval_outs = [o for o in stages[eval_key].get("outs") or [] if o["path"] in mets[eval_key]]
    if not eval_outs:
        raise PipelineError(f"dvc.yaml: stage {eval_key} declares no metrics file")
    eval_files = _metric_files([eval_key], lock, mets)
    eval_values = quoted_json(eval_outs[0]["path"], eval_outs[0].get("md5"), eval_files)
    # the checkpoint stage's own metrics file is not an input of this stage: quoted by md5 only (training_summary.json
    # inside the checkpoint carries the same figures)
    record = None if ckpt is None else build_card(ckpt, lock, metrics=mets, files={}, code=source_state(code, lock),
                                                  packages=packages, quote_metrics=False)
    evaluated = next((_entry(d) for d in stages[eval_key].get("deps") or []
                      if d["path"].rstrip("/") == model_dir.rstrip("/")), None)
    summary, source = (_json_in(Path(model_dir) / name) for name in ("training_summary.json", "source.json"))
    readme, full = compose_model_card(key, record, eval_key, eval_outs[0].get("md5"), eval_values,
                                      read_card(model_dir), (summary or {}).get("metrics"), source, evaluated)
    _write_card_dir(out_dir, readme, full)
    log.info("model card of %s (%s, %s) -> %s/", key, ckpt or model_dir, eval_key, out_dir)
    return full


def main(params, model: Optional[str] = None, lock_path: Path = LOCK,
         dvc_yaml_path: Path = DVC_YAML) -> Dict[str, dict]:
    """Dataset cards (no `model`) or the model card of one eval_scores.models key, where the catalog puts them."""
    lock = _load_yaml(Path(lock_path), "dvc.lock (run `dvc repro` first)")
    dvc_yaml = _load_yaml(Path(dvc_yaml_path), "dvc.yaml")
    if model is None:
        return write_dataset_cards(lock, dvc_yaml, catalog.DATASET_CARDS, git_state(), package_versions())
    models = dict(params.eval_scores.models)
    if model not in models:
        raise PipelineError(f"--model {model!r} is not a key of params.yaml eval_scores.models ({', '.join(models)})")
    card = write_model_card_dir(model, str(models[model]), lock, dvc_yaml, catalog.model_card(model),
                                git_state(), package_versions())
    return {model: card}
