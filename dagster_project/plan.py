"""`python -m dagster_project plan`: which items would rerun and why, without running anything.

`dvc status --json` names the items whose own inputs changed (a dep file, a param, the command, an out that is missing
or was edited); DVC does not list their downstream items, because their deps still match dvc.lock until the upstream
item reruns. We add those by walking the item graph downstream (the same out->dep edges the translator turns into asset
deps and partition mappings), so the plan is the set of asset partitions a full materialization would touch. An item
that reruns and writes byte-identical outs lets DVC skip its downstream items, so "upstream changed" means "may rerun".
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from .dvc_cli import dvc_json
from .manifest import DvcManifest, ManifestError, dep_matches_out
from .versions import default_is_code_dep

# Foreach keys (categories, eval model keys) become file names, DVC item names and Dagster partition keys; the same
# rule as pipelines.params CATEGORY_NAME / MODEL_KEY (not imported: the planner reads params.yaml without pydantic).
ITEM_KEY = re.compile(r"[a-z][a-z0-9_]*")


def check_item_keys(manifest: DvcManifest) -> None:
    """A foreach key with path characters ('a/b', '../x', 'V 1') makes the out->dep graph meaningless (it showed up
    as a 'dependency cycle'); refuse it first, naming the params key it came from."""
    for stage in manifest.stages.values():
        for key in stage.keys or ():
            if not isinstance(key, str) or not ITEM_KEY.fullmatch(key):
                source = (stage.foreach_source or "").strip()
                where = source[2:-1] if source.startswith("${") and source.endswith("}") else f"{stage.name} foreach"
                raise ManifestError(
                    f"params.yaml: {where}: {str(key)[:60]!r} is not a valid name (lower-case letters, digits and "
                    f"'_', starting with a letter; it becomes a file name and a partition key of stage {stage.name})"
                )


REASON_KINDS = ("never run", "missing out", "modified out", "changed command", "changed param", "changed code",
                "changed file", "always changed", "upstream changed")


@dataclass
class Reason:
    kind: str  # one of REASON_KINDS
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}" if self.detail else self.kind


@dataclass
class PlanEntry:
    item: str  # raw_cots@violence
    stage: str  # raw_cots
    partition: Optional[str]  # violence (None for a plain stage)
    reasons: List[Reason] = field(default_factory=list)

    @property
    def asset(self) -> str:
        return f"{self.stage}[{self.partition}]" if self.partition is not None else self.stage


def reasons_from_status(manifest: DvcManifest, item: str, entries: List[Any],
                        is_code_dep=default_is_code_dep) -> List[Reason]:
    """Translate one item's `dvc status` entries into reasons."""
    if manifest.lock_entry(item) is None:
        return [Reason("never run", "no record in dvc.lock")]
    params_files = {p.file for p in manifest.items[item].params}
    out: List[Reason] = []
    for entry in entries:
        if isinstance(entry, str):
            kind = "changed command" if entry in ("changed command", "changed checksum") else entry
            out.append(Reason(kind, manifest.items[item].cmd if kind == "changed command" else ""))
            continue
        for path, st in (entry.get("changed deps") or {}).items():
            if path in params_files or isinstance(st, Mapping):
                if isinstance(st, Mapping):
                    out.extend(Reason("changed param", f"{path}:{k} ({v})") for k, v in st.items())
                else:
                    out.append(Reason("changed param", f"{path} ({st})"))
            elif is_code_dep(manifest.root, path):
                out.append(Reason("changed code", f"{path} ({st})"))
            else:
                out.append(Reason("changed file", f"{path} ({st})"))
        for path, st in (entry.get("changed outs") or {}).items():
            kind = "modified out" if st == "modified" else "missing out"
            out.append(Reason(kind, f"{path} ({st})"))
    return out


def _produced_by_stale(manifest: DvcManifest, reasons: List[Reason], stale: set) -> bool:
    """True when every changed-file reason is a dep produced by an item that is itself stale (then the change is
    the upstream's doing, e.g. a deleted upstream out), so it reads better as `upstream changed`."""
    files = [r for r in reasons if r.kind == "changed file"]
    if not files or len(files) != len(reasons):
        return False
    for r in files:
        path = r.detail.rsplit(" (", 1)[0]
        if not any(dep_matches_out(path, o.path) for n in stale for o in manifest.items[n].outs):
            return False
    return True


def plan(root: str | Path, status: Optional[Mapping[str, List[Any]]] = None,
         manifest: Optional[DvcManifest] = None, is_code_dep=default_is_code_dep) -> List[PlanEntry]:
    """Items that `dvc repro` would rerun, upstream first, each with its reasons."""
    manifest = manifest or DvcManifest.load(root)
    check_item_keys(manifest)  # before the graph walk: a bad key reads as a cycle there
    if status is None:
        status = dvc_json(["status"], manifest.root)  # type: ignore[assignment]
    status = dict(status or {})
    for name in manifest.items:  # an item missing from dvc.lock is stale even if dvc status is quiet about it
        if manifest.lock_entry(name) is None:
            status.setdefault(name, [])
    entries: Dict[str, PlanEntry] = {}
    for name in manifest.topological_order():
        item = manifest.items[name]
        own = reasons_from_status(manifest, name, status[name], is_code_dep) if name in status else []
        ups = [u for u in manifest.upstream_items(name) if u in entries]
        if ups and _produced_by_stale(manifest, own, set(ups)):
            own = []
        if ups:
            own.append(Reason("upstream changed", ", ".join(ups)))
        if own:
            entries[name] = PlanEntry(name, item.stage, item.key, own)
    return list(entries.values())


def format_plan(entries: List[PlanEntry], total: int) -> str:
    if not entries:
        return f"Nothing to rerun: all {total} items match dvc.lock."
    w_item = max(len("ITEM"), *(len(e.item) for e in entries))
    w_asset = max(len("ASSET[PARTITION]"), *(len(e.asset) for e in entries))
    lines = [f"{'ITEM':<{w_item}}  {'ASSET[PARTITION]':<{w_asset}}  WHY"]
    for e in entries:
        for i, r in enumerate(e.reasons):
            lines.append(f"{e.item if i == 0 else '':<{w_item}}  {e.asset if i == 0 else '':<{w_asset}}  {r}")
    lines.append(f"{len(entries)} of {total} items would rerun (nothing was run).")
    return "\n".join(lines)


def plan_json(entries: List[PlanEntry]) -> List[Dict[str, Any]]:
    return [{**asdict(e), "asset": e.stage, "reasons": [asdict(r) for r in e.reasons]} for e in entries]
