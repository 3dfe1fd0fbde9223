"""Artifact cards: one JSON + markdown card per dataset or checkpoint stage in dvc.lock, saying what the artifact is
and exactly where it came from.

    python -m pipelines cards        # writes data/cards/<stage>[@item].json and .md (e.g. judged_cots@violence.json)

A card names, all read from dvc.lock unless said otherwise:
- the stage's outputs with their md5 (the version DVC pushes and pulls), and its metrics files with their values;
- the stage's params and its direct inputs (deps) with their md5 and the stage that produced each;
- the whole upstream lineage, recursively: every stage whose outputs feed this one, with its deps, outs and params;
- the spec it descends from: per category, the spec chunk's md5 (dvc.lock) and sha256 (of the file, checked
  against the md5, so a card never describes a workspace that differs from dvc.lock);
- every seed found in those params (`seed`, `*_seed` keys);
- the code version (git commit; dirty flag and paths: tracked files that differ from it, not counting dvc.lock and
  stage outputs, which the run itself rewrites) and installed package versions, as seen when the card is written
  (under `dvc repro`, the environment and commit the stages ran with);
- for checkpoints: the evaluation metrics of the eval stage that depends on it (`eval_scores@<model>`), when present.

Which stages get a card: `CARD_STAGES` (stages not yet in dvc.lock are skipped). Everything else is generic over
dvc.yaml: lineage follows paths (an input is produced by the stage whose out equals it, contains it or lies in it).
"""
from __future__ import annotations

import hashlib
import json
import logging
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import yaml

from .errors import PipelineError
from .io import atomic_path, read_text

log = logging.getLogger("cards")

# ---------------------------------------------------------------------------- what gets a card
CARD_STAGES = ("base_model", "raw_cots", "judged_cots", "sft_dataset", "sft_checkpoint", "rl_checkpoint")
CHECKPOINT_STAGES = ("base_model", "sft_checkpoint", "rl_checkpoint")  # the rest are datasets
SPEC_STAGE = "spec_chunks"  # its outs are spec(category) texts, one item per category
EVAL_STAGES = ("eval_scores",)  # their metrics become the `eval` section of the checkpoint they depend on
PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "safetensors", "dvc", "dvclive",
            "dagster", "pydantic", "deliberative-factory")
OUT_DIR = Path("data/cards")
LOCK = Path("dvc.lock")
DVC_YAML = Path("dvc.yaml")
CARD_VERSION = 1


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


# ---------------------------------------------------------------------------- the card
def build_card(key: str, lock: Mapping[str, Any], *, metrics: Mapping[str, set], files: Mapping[str, bytes],
               code: Mapping[str, Any], packages: Mapping[str, Optional[str]]) -> dict:
    """The card of one dvc.lock stage. Pure: everything it needs is passed in.

    Args:
        key: stage key in dvc.lock (`sft_dataset`, `judged_cots@violence`).
        lock: parsed dvc.lock.
        metrics: {stage key: paths declared as metrics in dvc.yaml} (see `metrics_paths`).
        files: contents of the small files the card quotes: spec chunk outs and metrics outs, by path.
        code: {"git_commit", "dirty", "dirty_paths"}.
        packages: {distribution name: version or None}.

    Returns:
        The card as a JSON-ready dict; `outs[*].md5` are exactly dvc.lock's.

    Raises:
        PipelineError: a quoted file is missing or its md5 differs from dvc.lock, or a metrics file is not JSON.
    """
    stages = lock.get("stages") or {}
    if key not in stages:
        raise PipelineError(f"dvc.lock: no stage {key!r}")
    prod = producers(stages)
    s = stages[key]
    name, item = split_key(key)
    ups = upstream(key, prod)

    def quoted(path: str, md5: Optional[str]) -> bytes:
        if path not in files:
            raise PipelineError(f"{path}: listed in dvc.lock but not found (run `dvc checkout` or `dvc repro`)")
        data = files[path]
        if md5 is not None and hashlib.md5(data).hexdigest() != md5:
            raise PipelineError(f"{path}: md5 {hashlib.md5(data).hexdigest()} differs from dvc.lock ({md5}); "
                                "run `dvc repro` (or `dvc checkout`) so the workspace matches dvc.lock")
        return data

    def metric_values(path: str, md5: Optional[str]) -> Any:
        try:
            return json.loads(quoted(path, md5).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PipelineError(f"{path}: metrics file is not JSON ({e})") from None

    def split_outs(k: str) -> Tuple[List[dict], Dict[str, dict]]:
        arts, mets = [], {}
        for o in stages[k].get("outs") or []:
            if o["path"] in metrics.get(k, set()):
                mets[o["path"]] = {"md5": o.get("md5"), "values": metric_values(o["path"], o.get("md5"))}
            else:
                arts.append(_entry(o))
        return arts, mets

    def deps_of(k: str) -> List[dict]:
        return [{**_entry(d), "produced_by": prod[k][d["path"]]} for d in stages[k].get("deps") or []]

    outs, own_metrics = split_outs(key)

    # Spec: every spec_chunks item in the lineage (the stage's own category for per-category stages).
    spec = {}
    for k in [key, *ups]:
        st, cat = split_key(k)
        if st != SPEC_STAGE:
            continue
        for o in stages[k].get("outs") or []:
            data = quoted(o["path"], o.get("md5"))
            spec[cat or o["path"]] = {"path": o["path"], "md5": o.get("md5"),
                                      "sha256": hashlib.sha256(data).hexdigest()}

    seeds: Dict[str, Any] = {}
    for k in [*ups, key]:
        seeds.update(find_seeds(stages[k].get("params") or {}))

    # Evaluation: eval stages that depend on one of this checkpoint's outs. When several do (an eval of the SFT
    # model may also read the base model's tokenizer), prefer the item named after this stage (`sft` for sft_checkpoint).
    evals = {}
    if name in CHECKPOINT_STAGES:
        readers = [k for k in stages if split_key(k)[0] in EVAL_STAGES
                   and any(_covers(d["path"], o["path"]) for d in stages[k].get("deps") or [] for o in outs)]
        named = [k for k in readers if split_key(k)[1] == name.split("_")[0]]
        for k in named or readers:
            evals[k] = split_outs(k)[1]

    return {
        "card_version": CARD_VERSION,
        "card": key,
        "stage": name,
        "item": item,
        "kind": "checkpoint" if name in CHECKPOINT_STAGES else "dataset",
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
        "eval": evals,
    }


def build_cards(lock: Mapping[str, Any], dvc_yaml: Mapping[str, Any], files: Mapping[str, bytes],
                code: Mapping[str, Any], packages: Mapping[str, Optional[str]],
                card_stages: Iterable[str] = CARD_STAGES) -> Dict[str, dict]:
    """Cards of every dvc.lock stage whose stage name is in `card_stages`, by stage key, in dvc.lock order."""
    wanted = set(card_stages)
    stages = lock.get("stages") or {}
    keys = [k for k in stages if split_key(k)[0] in wanted]
    mets = metrics_paths(dvc_yaml, stages.keys())
    code = source_state(code, lock)
    return {k: build_card(k, lock, metrics=mets, files=files, code=code, packages=packages) for k in keys}


def source_state(code: Mapping[str, Any], lock: Mapping[str, Any]) -> dict:
    """`code` with dvc.lock and the stages' own outputs dropped from the dirty paths.

    A `dvc repro` rewrites dvc.lock and the git-tracked (cache: false) metrics before the cards stage runs, so they
    are always "modified" at that point; what tells whether the run matches its commit is the rest (code, spec,
    params, prompts).
    """
    outs = [o["path"] for s in (lock.get("stages") or {}).values() for o in s.get("outs") or []]
    if code.get("dirty") is None:
        return dict(code)
    paths = [p for p in code.get("dirty_paths") or []
             if Path(p).name != "dvc.lock" and not any(_covers(p, o) for o in outs)]
    return {**code, "dirty": bool(paths), "dirty_paths": paths}


def _short(v: Any, width: int = 80) -> str:
    text = json.dumps(v, ensure_ascii=False) if not isinstance(v, str) else v
    return text if len(text) <= width else text[: width - 1] + "…"


def render_markdown(card: Mapping[str, Any]) -> str:
    """The card as markdown for people; the JSON next to it is the complete record."""
    c = card
    code = c["code"]
    lines = [f"# {c['card']} ({c['kind']})", "", f"Produced by `{c['cmd']}`.", ""]
    lines += ["## Outputs (dvc.lock)", "", "| path | md5 | size (bytes) | files |", "|---|---|---|---|"]
    lines += [f"| `{o['path']}` | `{o['md5']}` | {o.get('size', '')} | {o.get('nfiles', 1)} |" for o in c["outs"]]
    if c["metrics"]:
        lines += ["", "## Metrics", ""]
        for path, m in c["metrics"].items():
            lines.append(f"- `{path}` (md5 `{m['md5']}`): {_short(m['values'], 300)}")
    if c["eval"]:
        lines += ["", "## Evaluation", ""]
        for k, files in c["eval"].items():
            for path, m in files.items():
                lines.append(f"- {k}: `{path}` (md5 `{m['md5']}`): {_short(m['values'], 300)}")
    if c["spec"]:
        lines += ["", "## Spec", "", "| category | spec chunk | md5 (dvc.lock) | sha256 |", "|---|---|---|---|"]
        lines += [f"| {cat} | `{s['path']}` | `{s['md5']}` | `{s['sha256']}` |" for cat, s in c["spec"].items()]
    lines += ["", "## Parameters (dvc.lock)", ""]
    flat = flatten_params(c["params"])
    lines += [f"- `{k}`: {_short(v)}" for k, v in flat.items()] or ["(none)"]
    lines += ["", "## Seeds", ""]
    lines += [f"- `{k}`: {v}" for k, v in c["seeds"].items()] or ["(none found in the lineage's params)"]
    lines += ["", "## Inputs", "", "| path | md5 | produced by |", "|---|---|---|"]
    lines += [f"| `{d['path']}` | `{d['md5']}` | {', '.join(d['produced_by']) or '(source)'} |" for d in c["deps"]]
    lines += ["", "## Upstream lineage", ""]
    if c["upstream"]:
        lines += ["| stage | outputs (md5) | params |", "|---|---|---|"]
        for u in c["upstream"]:
            outs = "<br>".join(f"`{o['path']}` `{o['md5']}`" for o in u["outs"])
            params = ", ".join(f"`{k}`" for k in flatten_params(u["params"])) or "-"
            lines.append(f"| {u['stage']} | {outs} | {_short(params, 200)} |")
    else:
        lines.append("(none: built from source files only)")
    dirty = "unknown" if code.get("dirty") is None else ("yes: " + ", ".join(code.get("dirty_paths") or [])
                                                          if code["dirty"] else "no")
    lines += ["", "## Code and environment", "", f"- git commit: `{code.get('git_commit')}`",
              f"- uncommitted changes to tracked files (besides dvc.lock and stage outputs): {dirty}",
              "- packages: " + ", ".join(f"{k} {v or '(not installed)'}" for k, v in c["packages"].items()), ""]
    return "\n".join(lines)


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


def main(params, lock_path: Path = LOCK, dvc_yaml_path: Path = DVC_YAML, out_dir: Path = OUT_DIR) -> Dict[str, dict]:
    """Write data/cards/<key>.json and .md for every carded stage in dvc.lock (the folder is replaced as a whole).

    `params` (the validated params.yaml) is accepted for the CLI's uniform call; everything else comes from dvc.lock.
    """
    lock = _load_yaml(Path(lock_path), "dvc.lock (run `dvc repro` first)")
    dvc_yaml = _load_yaml(Path(dvc_yaml_path), "dvc.yaml")
    stages = lock.get("stages") or {}
    mets = metrics_paths(dvc_yaml, stages.keys())
    wanted = [p for k, s in stages.items() for o in s.get("outs") or []
              for p in [o["path"]] if split_key(k)[0] == SPEC_STAGE or p in mets[k]]
    files = {p: Path(p).read_bytes() for p in wanted if Path(p).is_file()}
    cards = build_cards(lock, dvc_yaml, files, git_state(), package_versions())
    if not cards:
        raise PipelineError(f"{lock_path}: none of the stages {', '.join(CARD_STAGES)} has run yet; nothing to card")
    with atomic_path(out_dir, is_dir=True) as tmp:
        tmp.mkdir(parents=True, exist_ok=True)
        for key, card in cards.items():
            (tmp / f"{key}.json").write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            (tmp / f"{key}.md").write_text(render_markdown(card), encoding="utf-8")
    log.info("%d cards -> %s/ (%s)", len(cards), out_dir, ", ".join(cards))
    return cards
