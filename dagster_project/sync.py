"""`sync(instance, project_dir)`: tell Dagster what DVC produced outside it (`dvc repro`, `dvc exp apply`, `dvc pull` /
`checkout`), so the UI shows a `make run` as materialized instead of "Never materialized".

1. Observe the inputs (inputs.py): an `AssetObservation` per input partition whose md5 is not already its latest
   observed data version.
2. Ask `dvc status` once. Every stage item it does not report (deps, outs and params match dvc.lock, the outs exist)
   and that dvc.lock records, upstream first, becomes a runless `AssetMaterialization` of its asset partition with what
   a Dagster-launched run writes: dvc.lock's data version, the stage's code version, the translator's metadata
   (`dvc/reused` left out: nothing says whether DVC ran or restored it; `dvc/synced` instead) and the provenance tags
   Dagster's staleness reads (each parent's data version and the storage id of its latest event). Items it reports
   are left out; Dagster does not watch outs, so a hand-edited out shows in `dvc status` and `audit`, not as stale.
3. An item is skipped when its latest materialization already carries that data version and code version and Dagster
   finds no changed dependency for it, so a second sync records nothing. A materialization whose provenance went
   stale while DVC says the item is clean (a run launched before an edit was observed) is recorded again.

Nothing runs and no check is evaluated: the cost is one `dvc status` (DVC caches out hashes by inode/mtime/size) and
a few event-log queries per item. `dvc_sync_sensor` (sensors.py) calls it when dvc.lock changes, `make ui` at start.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import dagster as dg

from .dvc_cli import dvc_json, status_in_process
from .inputs import data_version as input_version
from .manifest import DvcManifest
from .resource import CODE_VERSION_TAG, DATA_VERSION_TAG, USER_PROVIDED_TAG
from .translator import DagsterDvcTranslator
from .versions import data_version

INPUT_DATA_VERSION_TAG = "dagster/input_data_version"  # + "/<asset key>": what Dagster's staleness compares
INPUT_EVENT_POINTER_TAG = "dagster/input_event_pointer"  # + "/<asset key>": storage id of that parent's event
DEFAULT_VERSION = "INITIAL"  # Dagster's data version of a parent with no event yet
SYNC_DESCRIPTION = "Recorded by sync: DVC produced this outside Dagster; dvc.lock holds this version."

AssetPartition = Tuple[str, Optional[str]]  # (asset key as a string, partition key or None)


@dataclass
class SyncResult:
    observed: List[AssetPartition] = field(default_factory=list)  # input partitions with a new observation
    materialized: List[AssetPartition] = field(default_factory=list)  # stage items recorded now
    changed: List[str] = field(default_factory=list)  # items `dvc status` reports changed: not recorded
    in_dagster: int = 0  # stage items already recorded with this data version (skipped)
    never_run: List[str] = field(default_factory=list)  # items dvc.lock has no record of

    def summary(self) -> str:
        parts = [f"observed {len(self.observed)} input partition(s)",
                 f"recorded {len(self.materialized)} DVC item(s) as materializations",
                 f"{self.in_dagster} already in Dagster"]
        if self.changed:
            parts.append(f"changed per dvc status, not recorded: {', '.join(self.changed)}")
        if self.never_run:
            parts.append(f"never run: {', '.join(self.never_run)}")
        return "; ".join(parts)


# ------------------------------------------------------------------------------------------------ event log reads
def _filter(key: dg.AssetKey, partition: Optional[str]) -> dg.AssetRecordsFilter:
    return dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition] if partition is not None else None)


def latest_record(instance: dg.DagsterInstance, key: dg.AssetKey, partition: Optional[str],
                  observation: bool) -> Any:
    """The latest materialization (or observation) record of one partition; of any partition when it is None."""
    fetch = instance.fetch_observations if observation else instance.fetch_materializations
    return next(iter(fetch(_filter(key, partition), limit=1).records), None)


def _tags(record: Any) -> Mapping[str, str]:
    return (record.event_log_entry.tags or {}) if record is not None else {}


# ------------------------------------------------------------------------------------------------ staleness
def stale_resolver(instance: dg.DagsterInstance, asset_graph: Any) -> Any:
    """Dagster's own staleness logic (what the UI shows as "Unsynced"), for one point in time. Built from Dagster's
    internal modules the way its test helpers build it: Dagster 1.13 has no public constructor for it."""
    from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
    from dagster._core.definitions.data_version import CachingStaleStatusResolver
    from dagster._time import get_current_datetime

    view = AssetGraphView(temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None),
                          instance=instance, asset_graph=asset_graph)
    return CachingStaleStatusResolver(instance=instance, asset_graph=asset_graph, loading_context=view)


def unsynced(instance: dg.DagsterInstance, asset_graph: Any) -> Dict[AssetPartition, List[str]]:
    """(asset, partition) -> reasons, for every materializable asset partition Dagster finds stale or missing."""
    from dagster._core.definitions.data_version import StaleStatus

    resolver = stale_resolver(instance, asset_graph)
    out: Dict[AssetPartition, List[str]] = {}
    for key in sorted(asset_graph.materializable_asset_keys):
        node = asset_graph.get(key)
        for partition in (node.partitions_def.get_partition_keys() if node.partitions_def else [None]):
            status = resolver.get_status(key, partition)
            if status == StaleStatus.MISSING:
                out[(key.to_user_string(), partition)] = ["never materialized"]
            elif status == StaleStatus.STALE:
                out[(key.to_user_string(), partition)] = [
                    f"{c.reason}" + (f" ({_name(c.dependency)})" if c.dependency else "")
                    for c in resolver.get_stale_causes(key, partition)]
    return out


def _name(asset_partition: Any) -> str:
    key = asset_partition.asset_key.to_user_string()
    return f"{key}[{asset_partition.partition_key}]" if asset_partition.partition_key else key


def _has_changed_dependency(resolver: Any, key: dg.AssetKey, partition: Optional[str]) -> bool:
    """Dagster's stale causes other than the code version (compared by the caller against the current code, since
    a running code location may not have reloaded since the code changed)."""
    from dagster._core.definitions.data_version import StaleCauseCategory

    return any(c.category != StaleCauseCategory.CODE for c in resolver.get_stale_causes(key, partition))


# ------------------------------------------------------------------------------------------------ observing inputs
def observe_inputs(instance: dg.DagsterInstance, manifest: DvcManifest,
                   translator: Optional[DagsterDvcTranslator] = None) -> List[AssetPartition]:
    """Record an observation (data version = md5) of every input partition whose md5 Dagster does not have yet."""
    translator = translator or DagsterDvcTranslator()
    observed: List[AssetPartition] = []
    for source in translator.get_inputs(manifest).sources.values():
        key = translator.get_input_asset_key(source)
        for partition, path in source.paths().items():
            version = input_version(manifest.root, path)
            if _tags(latest_record(instance, key, partition, observation=True)).get(DATA_VERSION_TAG) == version:
                continue
            instance.report_runless_asset_event(dg.AssetObservation(
                asset_key=key, partition=partition, tags={DATA_VERSION_TAG: version, USER_PROVIDED_TAG: "true"},
                metadata={"path": dg.MetadataValue.path(str(manifest.root / path)), "dvc/md5": version},
                description="Observed by sync."))
            observed.append((key.to_user_string(), partition))
    return observed


# ------------------------------------------------------------------------------------------------ provenance
def provenance_tags(instance: dg.DagsterInstance, asset_graph: Any, key: dg.AssetKey,
                    partition: Optional[str]) -> Dict[str, str]:
    """The input tags a Dagster run writes on a materialization: per parent asset its data version (for a
    partitioned parent, a sha256 over the mapped partitions' versions in key order) and the storage id of its latest
    event, which Dagster's staleness uses as the cursor for "updated since"."""
    tags: Dict[str, str] = {}
    for parent in sorted(asset_graph.get(key).parent_keys):
        node = asset_graph.get(parent)
        latest = latest_record(instance, parent, None, observation=node.is_external)
        if node.partitions_def is None:
            version = _tags(latest).get(DATA_VERSION_TAG, DEFAULT_VERSION)
        else:
            keys = asset_graph.get_parent_partition_keys_for_child(partition, parent, key) \
                .partitions_subset.get_partition_keys()
            versions = [_tags(latest_record(instance, parent, p, node.is_external)).get(DATA_VERSION_TAG, "")
                        for p in sorted(keys)]
            version = hashlib.sha256("".join(versions).encode()).hexdigest()
        name = parent.to_user_string()
        tags[f"{INPUT_DATA_VERSION_TAG}/{name}"] = version
        tags[f"{INPUT_EVENT_POINTER_TAG}/{name}"] = str(latest.storage_id) if latest is not None else "NULL"
    return tags


# ------------------------------------------------------------------------------------------------ sync
def dvc_status(project_dir: Path) -> Dict[str, Any]:
    """`dvc status` as a dict (item -> what changed); in process when possible, else the CLI (waits for DVC's lock)."""
    status = status_in_process(project_dir)
    if status is None:
        status = dvc_json(["status"], project_dir)
    return dict(status) if isinstance(status, dict) else {}


def sync(instance: dg.DagsterInstance, project_dir: str | Path, *, translator: Optional[DagsterDvcTranslator] = None,
         asset_graph: Any = None, manifest: Optional[DvcManifest] = None,
         status: Optional[Mapping[str, Any]] = None) -> SyncResult:
    """Observe the inputs and record every clean DVC item Dagster does not have yet (see the module docstring).

    Args:
        instance: the Dagster instance to write to.
        project_dir: the DVC project root.
        translator: the one the definitions use (asset keys, code versions, metadata).
        asset_graph: the definitions' asset graph (built from `build_definitions(project_dir)` when None).
        manifest: the DvcManifest the asset graph was built from; its dvc.lock is read again here.
        status: `dvc status` output if the caller has it (the sensor asks DVC without waiting for its lock).
    """
    root = Path(project_dir).resolve()
    translator = translator or DagsterDvcTranslator()
    base = manifest if manifest is not None else DvcManifest.load(root)
    manifest = base.with_fresh_lock() if manifest is not None else base
    if asset_graph is None:
        from .build import build_definitions

        asset_graph = build_definitions(root, translator=translator, manifest=base).resolve_asset_graph()
    status = dvc_status(root) if status is None else status

    # the inputs of the manifest the definitions were built from (the translator memoises them per manifest)
    result = SyncResult(observed=observe_inputs(instance, base, translator))
    resolver = None  # caches what it reads: built anew after each event written
    codes: Dict[str, str] = {}  # stage -> code version (hashes the stage's code files once)
    for name in manifest.topological_order():  # upstream first: a parent's event exists before its child's pointer
        item = manifest.items[name]
        dv = data_version(manifest, name)
        if name in status:
            result.changed.append(name)
            continue
        if dv is None:
            result.never_run.append(name)
            continue
        stage = manifest.stages[item.stage]
        key = translator.get_asset_key(stage)
        if stage.name not in codes:
            codes[stage.name] = translator.get_code_version(manifest, stage)
        code = codes[stage.name]
        latest = _tags(latest_record(instance, key, item.key, observation=False))
        if latest.get(DATA_VERSION_TAG) == dv and latest.get(CODE_VERSION_TAG) == code:
            resolver = resolver or stale_resolver(instance, asset_graph)
            if not _has_changed_dependency(resolver, key, item.key):
                result.in_dagster += 1
                continue
        metadata = dict(translator.get_materialization_metadata(manifest, item, reused=False))
        metadata.pop("dvc/reused", None)
        metadata["dvc/synced"] = True
        tags = {**provenance_tags(instance, asset_graph, key, item.key),
                CODE_VERSION_TAG: code, DATA_VERSION_TAG: dv, USER_PROVIDED_TAG: "true"}
        instance.report_runless_asset_event(dg.AssetMaterialization(
            asset_key=key, partition=item.key, metadata=metadata, tags=tags, description=SYNC_DESCRIPTION))
        result.materialized.append((key.to_user_string(), item.key))
        resolver = None
    return result


def lock_digest(project_dir: str | Path) -> str:
    """sha256 of dvc.lock's bytes ("none" without one): the sensor syncs when it changes."""
    path = Path(project_dir) / "dvc.lock"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "none"
