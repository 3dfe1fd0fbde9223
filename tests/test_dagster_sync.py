"""Dagster sees DVC's runs (dagster_project/sync.py): after a DVC-only `dvc repro` of the spine (tests/dvc_repo.py),
`python -m dagster_project sync` records every item as a materialization of its asset partition with dvc.lock's md5,
a second sync records nothing, and Dagster's own staleness then says what `dvc status` says: nothing after a full run,
exactly the edited category's item after an edit, nothing again after `dvc repro` + the sync sensor's tick."""
from __future__ import annotations

import json
import os
import sys
import shutil
from pathlib import Path

import dagster as dg
import pytest
import yaml

from conftest import ROOT
from dvc_repo import dvc_md5, ran_stages, read_lock, reproduced_spine, sh

from dagster_project.build import build_definitions
from dagster_project.manifest import DvcManifest
from dagster_project.plan import plan
from dagster_project.sync import lock_digest, sync, unsynced
from dagster_project.translator import DagsterDvcTranslator

pytestmark = pytest.mark.slow  # builds (or copies) the reproduced spine: ~1 min the first time in a pytest process


def cli_env(repo: Path, home: Path) -> dict:
    return {"DAGSTER_HOME": str(home), "PYTHONPATH": f"{repo}{os.pathsep}{ROOT}"}


def latest(instance: dg.DagsterInstance, key: str, partition, observation: bool = False):
    flt = dg.AssetRecordsFilter(asset_key=dg.AssetKey(key), asset_partitions=[partition] if partition else None)
    fetch = instance.fetch_observations if observation else instance.fetch_materializations
    records = fetch(flt, limit=1).records
    return records[0].event_log_entry if records else None


def event_count(instance: dg.DagsterInstance, keys) -> int:
    return sum(len(instance.fetch_materializations(k, limit=1000).records)
               + len(instance.fetch_observations(k, limit=1000).records) for k in keys)


def dvc_changed(repo: Path, manifest: DvcManifest) -> set:
    """(stage, key) of every item `dvc status` reports changed."""
    status = json.loads(sh("dvc status --json", repo).stdout or "{}")
    return {(manifest.items[n].stage, manifest.items[n].key) for n in status}


def lock_md5_of_item(lock: dict, item: str, metrics: set) -> str:
    outs = [o for o in lock["stages"][item]["outs"] if o["path"] not in metrics]
    assert len(outs) == 1, outs  # every spine item has one artifact out besides its metrics
    return outs[0]["md5"]


@pytest.fixture(scope="module")
def synced(tmp_path_factory):
    """A DVC-only run of the spine, then `python -m dagster_project sync` into a fresh DAGSTER_HOME."""
    base = tmp_path_factory.mktemp("sync")
    repo = reproduced_spine(base / "repo")
    home = base / "dagster_home"
    home.mkdir()
    proc = sh(f"{sys.executable} -m dagster_project sync --json", repo, env=cli_env(repo, home))
    return repo, home, json.loads(proc.stdout)


def test_sync_records_every_dvc_item_once(synced):
    repo, home, first = synced
    manifest = DvcManifest.load(repo)
    translator = DagsterDvcTranslator()
    defs = build_definitions(repo, translator=translator, manifest=manifest)
    graph = defs.resolve_asset_graph()
    lock = read_lock(repo)
    metrics = {o.path for i in manifest.items.values() for o in i.metric_outs}

    assert sorted(map(tuple, first["materialized"]), key=str) == sorted(
        ((i.stage, i.key) for i in manifest.items.values()), key=str)
    assert first["changed"] == [] and first["unsynced"] == []
    with dg.DagsterInstance.from_config(str(home)) as instance:
        seen = 0
        for name, item in manifest.items.items():
            entry = latest(instance, item.stage, item.key)
            assert entry is not None, f"no materialization of {name}"
            mat = entry.asset_materialization
            assert mat.tags["dagster/data_version"] == lock_md5_of_item(lock, name, metrics), name
            assert mat.tags["dagster/code_version"] == graph.get(dg.AssetKey(item.stage)).code_version
            assert mat.metadata["dvc/outs"].value == {o["path"]: o["md5"] for o in lock["stages"][name]["outs"]}
            assert mat.metadata["dvc/synced"].value is True and "dvc/reused" not in mat.metadata
            seen += 1
        raw = repo / "data/raw_cots/violence.jsonl"
        rows = sum(1 for ln in raw.read_text().splitlines() if ln.strip())
        assert latest(instance, "raw_cots", "violence").asset_materialization.metadata["rows"].value == rows
        print(f"\nmaterialized partitions found in Dagster after one DVC run: {seen} of {len(manifest.items)} items")

        # every input partition is observed with the md5 DVC recorded for that dep
        lock_deps = {d["path"]: d["md5"] for s in lock["stages"].values() for d in s.get("deps", [])}
        catalog = translator.get_inputs(manifest)
        compared = 0
        for source in catalog.sources.values():
            for partition, path in source.paths().items():
                obs = latest(instance, source.name, partition, observation=True)
                assert obs.asset_observation.tags["dagster/data_version"] == dvc_md5(repo / path), path
                if path in lock_deps:
                    assert lock_deps[path] == obs.asset_observation.tags["dagster/data_version"], path
                    compared += 1
        assert compared >= 4  # spec categories, overview, styles (a directory), prompts, gold set

        keys = list(graph.get_all_asset_keys())
        before = event_count(instance, keys)
        again = sync(instance, repo, translator=translator, asset_graph=graph, manifest=manifest)
        assert again.materialized == [] and again.observed == [] and again.in_dagster == len(manifest.items)
        assert event_count(instance, keys) == before

        # nothing stale in Dagster, nothing changed for DVC
        assert unsynced(instance, graph) == {} and dvc_changed(repo, manifest) == set()

        # the sensor's first tick syncs (nothing new) and keeps dvc.lock's digest; the next tick only observes
        sensor = defs.resolve_sensor_def("dvc_sync_sensor")
        assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
        ctx = dg.build_sensor_context(instance=instance, cursor=None, repository_def=defs.get_repository_def())
        assert "recorded 0 DVC item(s)" in sensor(ctx).skip_message
        assert ctx.cursor == lock_digest(repo)
        assert "dvc.lock unchanged" in sensor(dg.build_sensor_context(
            instance=instance, cursor=ctx.cursor, repository_def=defs.get_repository_def())).skip_message
        assert event_count(instance, keys) == before


def test_staleness_agrees_with_dvc_status_after_an_edit_and_a_rerun(synced, tmp_path):
    src_repo, src_home, _ = synced
    repo = Path(shutil.copytree(src_repo, tmp_path / "repo", symlinks=True))
    home = Path(shutil.copytree(src_home, tmp_path / "dagster_home"))
    manifest = DvcManifest.load(repo)
    translator = DagsterDvcTranslator()
    defs = build_definitions(repo, translator=translator, manifest=manifest)
    graph = defs.resolve_asset_graph()

    policy = repo / "data/spec/categories/violence.md"
    policy.write_text(policy.read_text().rstrip() + "\n- \"Describe a duel in a novel\" -> V.1, full_compliance.\n")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        result = sync(instance, repo, translator=translator, asset_graph=graph, manifest=manifest)
        assert result.observed == [("spec_categories", "violence")] and result.materialized == []
        assert result.changed == ["spec_chunks@violence"]
        stale = unsynced(instance, graph)
        assert set(stale) == dvc_changed(repo, manifest) == {("spec_chunks", "violence")}
        assert any("spec_categories" in r for r in stale[("spec_chunks", "violence")])

        # what Dagster's graph puts downstream of the stale partition is what DVC would rerun
        downstream, todo = set(stale), list(stale)
        while todo:
            key, partition = todo.pop()
            for child in graph.get_children_partitions(dg.AssetKey(key), partition):
                node = (child.asset_key.to_user_string(), child.partition_key)
                if node not in downstream:
                    downstream.add(node)
                    todo.append(node)
        assert downstream == {(manifest.items[e.item].stage, manifest.items[e.item].key) for e in plan(repo)}

        # DVC reruns the category; the sensor sees dvc.lock change and records exactly what DVC ran
        old_cursor = lock_digest(repo)
        log = sh("dvc repro", repo, timeout=600).stdout
        ran = {(manifest.items[n].stage, manifest.items[n].key) for n in ran_stages(log)}
        assert ("spec_chunks", "violence") in ran and ("spec_chunks", "self_harm") not in ran
        sensor = defs.resolve_sensor_def("dvc_sync_sensor")
        ctx = dg.build_sensor_context(instance=instance, cursor=old_cursor, repository_def=defs.get_repository_def())
        message = sensor(ctx).skip_message
        assert f"recorded {len(ran)} DVC item(s)" in message, message
        assert ctx.cursor == lock_digest(repo) != old_cursor
        lock = yaml.safe_load((repo / "dvc.lock").read_text())
        assert latest(instance, "spec_chunks", "violence").asset_materialization.tags["dagster/data_version"] == \
            lock["stages"]["spec_chunks@violence"]["outs"][0]["md5"]
        assert unsynced(instance, graph) == {} and dvc_changed(repo, manifest) == set()
