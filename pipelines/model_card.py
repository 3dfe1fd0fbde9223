"""Hugging Face model cards written inside a checkpoint directory, so the card travels with the weights.

    write_model_card(staging_dir, summary)   # beside training_summary.json, before the checkpoint is swapped in

The card is README.md with YAML front matter (`base_model`, `library_name`, `pipeline_tag`, `tags`, `datasets`, ...)
and a body that pins where the checkpoint came from: the base model (the md5 DVC records for its directory), every
training data file with its md5, size and row count, the spec files with one spec hash, the stage's params and seed,
and the versions of the libraries that wrote the weights. It holds nothing that changes between two runs of the same
inputs (no time, no git commit, no host), so a rerun writes the same bytes. Evaluation results and the dvc.lock
lineage are added by the cards stage in its own output (data/cards/models/), never here.

Light on imports on purpose: the training stages import this module, so any edit here reruns training.
"""
from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

from .errors import PipelineError
from .io import read_text, write_text

CARD_FILE = "README.md"
LIBRARY = "transformers"
TAGS = ("deliberative-alignment", "safety", "chain-of-thought")
STAGE_TAGS = {"sft_checkpoint": ("trl", "sft"), "rl_checkpoint": ("trl", "grpo"), "base_model": ("safetensors",)}
# Libraries whose versions decide how the weights were computed and saved.
FRAMEWORKS = ("transformers", "trl", "peft", "torch", "accelerate", "datasets", "safetensors")
_CHUNK = 1 << 20


# ---------------------------------------------------------------------------- hashing
def md5_file(path: Path) -> str:
    h = hashlib.md5()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _files_under(path: Path) -> List[Path]:
    return sorted((f for f in path.rglob("*") if f.is_file()), key=lambda f: f.relative_to(path).as_posix())


def manifest_md5(entries: Sequence[Mapping[str, str]]) -> str:
    """DVC 3's digest of a directory: md5 of the JSON list of {"md5", "relpath"} sorted by relpath, plus ".dir"."""
    ordered = sorted(({"md5": e["md5"], "relpath": e["relpath"]} for e in entries), key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(ordered, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"


def dvc_md5(path: str | Path) -> str:
    """The md5 dvc.lock records for `path` (a file's md5, or DVC's directory digest), computed from the bytes."""
    path = Path(path)
    if path.is_file():
        return md5_file(path)
    if not path.is_dir():
        raise PipelineError(f"{path}: not found (a model card input must exist)")
    return manifest_md5([{"md5": md5_file(f), "relpath": f.relative_to(path).as_posix()} for f in _files_under(path)])


def _rows(path: Path) -> Optional[int]:
    """Non-blank lines of a JSONL file (its records); None for other files."""
    if path.suffix != ".jsonl":
        return None
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def describe_path(path: str | Path, list_files: bool = True) -> dict:
    """{"path", "md5", "files": [{"path", "md5", "bytes", "rows"?}]} of a file or directory; paths as given.

    `md5` is what dvc.lock records for the path, so a card can be matched to a lock entry by eye or by script.
    """
    p = Path(path)
    if not p.exists():
        raise PipelineError(f"{p}: not found (a model card input must exist)")
    files = [p] if p.is_file() else _files_under(p)
    entries = []
    for f in files:
        rel = p.as_posix() if f == p else f"{p.as_posix()}/{f.relative_to(p).as_posix()}"
        entry: Dict[str, Any] = {"path": rel, "md5": md5_file(f), "bytes": f.stat().st_size}
        rows = _rows(f)
        if rows is not None:
            entry["rows"] = rows
        entries.append(entry)
    if p.is_file():
        digest = entries[0]["md5"]
    else:
        digest = manifest_md5([{"md5": e["md5"], "relpath": e["path"][len(p.as_posix()) + 1:]} for e in entries])
    out: Dict[str, Any] = {"path": p.as_posix(), "md5": digest}
    if list_files:
        out["files"] = entries
    return out


def spec_hash(described: Sequence[Mapping[str, Any]]) -> Optional[str]:
    """One hash for the spec: the DVC md5 of the single spec path, or DVC's directory digest over all their files."""
    if not described:
        return None
    if len(described) == 1:
        return described[0]["md5"]
    return manifest_md5([{"md5": f["md5"], "relpath": f["path"]} for d in described for f in d["files"]])


# ---------------------------------------------------------------------------- front matter
def render(front: Mapping[str, Any], body: str) -> str:
    """README text: `---`, the front matter as block YAML in the given key order, `---`, a blank line, the body."""
    head = yaml.safe_dump(dict(front), sort_keys=False, allow_unicode=True, default_flow_style=False, width=120)
    return f"---\n{head}---\n\n{body.rstrip()}\n"


def split_front_matter(text: str, source: str = "README.md") -> Tuple[Dict[str, Any], str]:
    """(front matter, body) of a card; a text without front matter gives ({}, text)."""
    if not text.startswith("---\n"):
        return {}, text
    end = text.find("\n---\n", 3)
    if end < 0:
        raise PipelineError(f"{source}: front matter opened with '---' is never closed")
    try:
        front = yaml.safe_load(text[4:end + 1]) or {}
    except yaml.YAMLError as e:
        raise PipelineError(f"{source}: invalid YAML front matter ({getattr(e, 'problem', e)})") from None
    if not isinstance(front, dict):
        raise PipelineError(f"{source}: front matter is not a mapping")
    return front, text[end + 5:].lstrip("\n")


def read_card(checkpoint_dir: str | Path) -> Optional[Tuple[Dict[str, Any], str]]:
    """(front matter, body) of the README.md in a checkpoint directory, or None when it has none."""
    path = Path(checkpoint_dir) / CARD_FILE
    if not path.is_file():
        return None
    return split_front_matter(read_text(path, "model card"), str(path))


# ---------------------------------------------------------------------------- the card
def framework_versions(names: Sequence[str] = FRAMEWORKS) -> Dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join("" if c is None else str(c) for c in r) + " |" for r in rows]


def model_card(stage: str, *, base_model: Optional[str | Path] = None, training_data: Sequence[str | Path] = (),
               spec: Sequence[str | Path] = (), params: Optional[Mapping[str, Any]] = None,
               seed: Optional[int] = None, frameworks: Optional[Mapping[str, str]] = None,
               description: str = "") -> str:
    """The README.md text of a checkpoint. Reads and hashes the files it names; writes nothing.

    Args:
        stage: the dvc.yaml stage that produced the checkpoint (`sft_checkpoint`); also the card's model name.
        base_model: the checkpoint directory it was trained from (hashed as DVC does), or a Hub id (quoted as is).
        training_data: the data files or directories it was trained on; each file is listed with md5/bytes/rows.
        spec: spec files or directories the training read (the RL reward judge's spec); one spec hash for all.
        params: the stage's params section as the run used it (JSON-ready).
        seed: the training seed.
        frameworks: library versions; default: the installed ones of FRAMEWORKS.
        description: one paragraph put under the title.

    Returns:
        The card text; the same inputs give the same bytes.

    Raises:
        PipelineError: a named input does not exist.
    """
    base = None
    if base_model is not None:
        base = describe_path(base_model, list_files=False) if Path(base_model).exists() else {"path": str(base_model)}
    data = [describe_path(p) for p in training_data]
    specs = [describe_path(p) for p in spec]
    versions = dict(frameworks) if frameworks is not None else framework_versions()

    front: Dict[str, Any] = {"model_name": stage, "library_name": LIBRARY, "pipeline_tag": "text-generation"}
    if base is not None:
        front["base_model"] = base["path"]
        front["base_model_relation"] = "finetune"
    front["tags"] = [*TAGS, *STAGE_TAGS.get(stage, ())]
    if data:
        front["datasets"] = [d["path"] for d in data]

    lines = [f"# {stage}", ""]
    lines += [description.strip(), ""] if description.strip() else []
    lines += [f"Written by the `{stage}` stage of the deliberative-alignment pipeline (`python -m pipelines {stage}`). "
              "Evaluation results with 95% intervals and the dvc.lock lineage are in the card the `model_cards` "
              "stage writes to `data/cards/models/`.", ""]
    if base is not None:
        lines += ["## Base model", ""]
        lines += [f"`{base['path']}`" + (f", md5 `{base['md5']}` (as dvc.lock records it)" if "md5" in base else ""),
                  ""]
    lines += ["## Training data", ""]
    if data:
        for d in data:
            lines += [f"`{d['path']}`: md5 `{d['md5']}`", ""]
            lines += _table(["file", "md5", "bytes", "rows"],
                            [[f"`{f['path']}`", f"`{f['md5']}`", f["bytes"], f.get("rows")] for f in d["files"]]) + [""]
    else:
        lines += ["(none given)", ""]
    if specs:
        lines += ["## Spec", "", f"Spec hash: `{spec_hash(specs)}`", ""]
        lines += _table(["file", "md5"], [[f"`{f['path']}`", f"`{f['md5']}`"] for d in specs for f in d["files"]])
        lines += [""]
    lines += ["## Training parameters", ""]
    if seed is not None:
        lines += [f"Seed: {seed}", ""]
    if params:
        dumped = yaml.safe_dump(dict(params), sort_keys=False, allow_unicode=True, default_flow_style=False, width=120)
        lines += ["```yaml", dumped.rstrip(), "```", ""]
    else:
        lines += ["(none given)", ""]
    if versions:
        lines += ["## Framework versions", ""] + [f"- {k} {v}" for k, v in versions.items()]
    return render(front, "\n".join(lines))


def card_inputs(summary: Mapping[str, Any]) -> Dict[str, Any]:
    """model_card() arguments from a training summary: `stage`, `params`, `seed`, the model it started from
    (`base_model`, or `model` for RL), its data (`dataset` or `datasets`) and `spec` (a path or a list)."""
    if not summary.get("stage"):
        raise PipelineError("model card: the training summary has no `stage`")

    def paths(*keys: str) -> List[str]:
        found: List[str] = []
        for k in keys:
            v = summary.get(k)
            if v:
                found += [str(x) for x in v] if isinstance(v, (list, tuple)) else [str(v)]
        return found

    base = summary.get("base_model") or summary.get("model")
    return {"stage": str(summary["stage"]), "base_model": str(base) if base else None,
            "training_data": paths("dataset", "datasets"), "spec": paths("spec"),
            "params": summary.get("params") or {}, "seed": summary.get("seed")}


def write_model_card(checkpoint_dir: str | Path, summary: Mapping[str, Any]) -> Path:
    """Write README.md into `checkpoint_dir` (the staging directory, before it is swapped into place).

    Call it on the rank that writes the checkpoint, after the weights: see `card_inputs` for the summary keys read.
    """
    args = card_inputs(summary)
    dest = Path(checkpoint_dir) / CARD_FILE
    write_text(dest, model_card(args.pop("stage"), **args))
    return dest
