"""Two sensors: `dvc_sync_sensor` (running) keeps Dagster in step with DVC; `spec_change_sensor` (stopped) reruns the
category partitions whose spec files changed.

dvc_sync_sensor: every 30 s it records an observation of each input whose md5 changed (cheap: the inputs are a few MB of
text) and, when dvc.lock's bytes changed since the last tick (cursor = their sha256), calls `sync.sync`, which records
what DVC produced outside Dagster as materializations. If DVC holds its repo lock (a `dvc repro` is under way) the
tick leaves the cursor alone and the next one tries again. It launches no run.

spec_change_sensor:

Each tick hashes every file under the watched directory (data/spec) and compares with the hashes kept in the sensor
cursor. A changed file maps to the DVC items that depend on it (a dep equal to the file or a directory holding it):
`data/spec/categories/violence.md` -> `spec_chunks@violence`; `data/spec/overview.md` or a style file -> every
category. For each affected foreach key it requests one run of that partition, selecting the partitioned stages that
are affected or downstream of an affected item with the same key (spec_chunks, raw_cots, judged_cots). Unpartitioned
stages further down (sft_dataset, training, evaluation) are left to `data_only` / `full_pipeline` / a backfill, so a
spec edit in three categories costs three category runs, not three SFT runs. The first tick only records hashes.

Why a sensor and not declarative automation (an `AutomationCondition` on the per-category stages): the inputs are now
observable assets, so `AutomationCondition.eager()` on spec_chunks/raw_cots/judged_cots would also react to a spec edit,
but it is evaluated by Dagster's automation sensor over every asset, reacts to any updated dependency (a new base
model would regenerate every category), and would make a plain edit start generation runs (which may call a paid
backend) unless that sensor is stopped. This sensor is opt-in, reacts to spec files only, and gives each content
digest one run key per category, so a re-tick never launches a second run of the same edit.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import dagster as dg

from .dvc_cli import status_in_process
from .manifest import DvcManifest, dep_matches_out
from .sync import lock_digest, observe_inputs, sync
from .translator import DagsterDvcTranslator


def hash_tree(root: Path, watch: str) -> Dict[str, str]:
    """relative path -> sha256 of every file under `root/watch`."""
    base = root / watch
    if not base.exists():
        return {}
    files = [base] if base.is_file() else sorted(f for f in base.rglob("*") if f.is_file())
    return {f.relative_to(root).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def changed_paths(previous: Dict[str, str], current: Dict[str, str]) -> List[str]:
    return sorted(p for p in set(previous) | set(current) if previous.get(p) != current.get(p))


def watched_keys(manifest: DvcManifest, watch: str) -> Optional[Tuple[str, ...]]:
    """The foreach keys the sensor works in: those of the first foreach stage (upstream first) with an item that
    depends on something under `watch` (spec_chunks -> the categories). Stages with other keys that also read the
    spec (eval_scores over models) are left out: they follow once the upstream data and models are rebuilt."""
    for name in manifest.stage_order():
        stage = manifest.stages[name]
        if stage.is_template and any(dep_matches_out(d, watch) for i in stage.items for d in i.deps):
            return stage.keys
    return None


def affected_partitions(manifest: DvcManifest, paths: Iterable[str],
                        keys: Optional[Tuple[str, ...]]) -> Dict[str, List[str]]:
    """foreach key -> stages to rerun for it: the items of foreach stages over `keys` that depend on a changed path,
    plus their downstream items in stages over the same keys. Plain stages and other key sets are not included."""
    paths = list(paths)
    hit = [n for n, item in manifest.items.items() if any(dep_matches_out(d, p) for d in item.deps for p in paths)]
    closure = set(hit) | set(manifest.descendants(hit))
    by_key: Dict[str, List[str]] = {}
    for name in manifest.topological_order():
        item = manifest.items[name]
        if name in closure and item.key is not None and manifest.stages[item.stage].keys == keys:
            by_key.setdefault(item.key, []).append(item.stage)
    return by_key


def build_spec_sensor(manifest: DvcManifest, translator: DagsterDvcTranslator, watch: str = "data/spec",
                      name: str = "spec_change_sensor", minimum_interval_seconds: int = 60) -> Optional[dg.SensorDefinition]:
    """The sensor for `watch`, targeting the partitioned assets whose items depend on it (None if there are none)."""
    keys = watched_keys(manifest, watch)
    probe = affected_partitions(manifest, [watch], keys)
    stages = [s for s in manifest.stage_order() if any(s in v for v in probe.values())]
    if not stages:
        return None
    asset_keys = [translator.get_asset_key(manifest.stages[s]) for s in stages]
    root = manifest.root

    @dg.sensor(name=name, target=dg.AssetSelection.assets(*asset_keys), default_status=dg.DefaultSensorStatus.STOPPED,
               minimum_interval_seconds=minimum_interval_seconds,
               description=f"Reruns the category partitions whose files under {watch}/ changed (see sensors.py).")
    def spec_change_sensor(context: dg.SensorEvaluationContext):
        current = hash_tree(root, watch)
        previous = json.loads(context.cursor) if context.cursor else None
        context.update_cursor(json.dumps(current, sort_keys=True))
        if previous is None:
            return dg.SkipReason(f"first tick: recorded the hashes of {len(current)} files under {watch}/")
        changed = changed_paths(previous, current)
        if not changed:
            return dg.SkipReason(f"no file under {watch}/ changed")
        fresh = DvcManifest.load(root)  # dvc.yaml / params.yaml may have changed since the code location loaded
        digest = hashlib.sha256(json.dumps(current, sort_keys=True).encode()).hexdigest()[:12]
        requests = []
        for key, stage_names in affected_partitions(fresh, changed, keys).items():
            if key not in (keys or ()):
                context.log.warning(f"new foreach key {key!r}: reload the code location to run it")
                continue
            selection = [translator.get_asset_key(fresh.stages[s]) for s in dict.fromkeys(stage_names)]
            requests.append(dg.RunRequest(run_key=f"{key}:{digest}", partition_key=key, asset_selection=selection,
                                          tags={"dvc/changed": ",".join(changed)[:200]}))
        return requests or dg.SkipReason(f"changed {', '.join(changed)}: no partitioned stage depends on it")

    return spec_change_sensor


def request_summary(requests: List[dg.RunRequest]) -> List[Tuple[str, List[str]]]:
    """(partition, [asset keys]) of run requests, for logs and tests."""
    return [(r.partition_key or "", [k.to_user_string() for k in r.asset_selection or []]) for r in requests]


def build_sync_sensor(manifest: DvcManifest, translator: DagsterDvcTranslator, name: str = "dvc_sync_sensor",
                      minimum_interval_seconds: int = 30) -> dg.SensorDefinition:
    """The sensor that records DVC's runs and the inputs' versions in Dagster (see the module docstring)."""
    root = manifest.root

    @dg.sensor(name=name, default_status=dg.DefaultSensorStatus.RUNNING,
               minimum_interval_seconds=minimum_interval_seconds,
               description="Records what DVC produced outside Dagster (on a dvc.lock change) and the inputs' md5s. "
                           "Runs nothing (see sensors.py).")
    def dvc_sync_sensor(context: dg.SensorEvaluationContext):
        digest = lock_digest(root)
        if digest == context.cursor:
            observed = observe_inputs(context.instance, manifest, translator)
            return dg.SkipReason(f"dvc.lock unchanged; observed {len(observed)} changed input partition(s)")
        status = status_in_process(root)  # never waits: a `dvc repro` may hold the lock for an hour
        if status is None:
            return dg.SkipReason("DVC is busy (repo lock held) or could not answer; trying again next tick")
        result = sync(context.instance, root, translator=translator, asset_graph=context.repository_def.asset_graph,
                      manifest=manifest, status=status)
        context.update_cursor(digest)
        return dg.SkipReason(result.summary())

    return dvc_sync_sensor
