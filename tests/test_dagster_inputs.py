"""The files users edit as Dagster input assets (dagster_project/inputs.py): found from dvc.yaml's deps alone, every
file a stage reads belongs to exactly one input partition, the asset graph wires exactly the partitions an item reads,
and observing returns the md5 DVC gives the path. No DVC run here (tests/test_dagster_sync.py runs DVC)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import dagster as dg
import pytest
import yaml

from conftest import ROOT
from dvc_repo import dvc_md5

from dagster_project.build import build_definitions
from dagster_project.manifest import DvcManifest, contains
from dagster_project.translator import DagsterDvcTranslator
from dagster_project.versions import default_is_code_dep


def files_read(manifest: DvcManifest) -> dict:
    """item -> the files on disk under its deps that no stage writes and that are not code (computed from the disk,
    apart from inputs.py's discovery)."""
    outs = [o.path for i in manifest.items.values() for o in i.outs]
    out = {}
    for name, item in manifest.items.items():
        found = set()
        for dep in item.deps:
            if default_is_code_dep(manifest.root, dep) or any(contains(dep, o) or contains(o, dep) for o in outs):
                continue
            p = manifest.root / dep
            paths = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
            found |= {f.relative_to(manifest.root).as_posix() for f in paths}
        out[name] = found
    return out


@pytest.fixture(scope="module")
def project():
    translator = DagsterDvcTranslator()
    manifest = DvcManifest.load(ROOT)
    defs = build_definitions(ROOT, translator=translator)
    return manifest, translator, defs, defs.resolve_asset_graph()


def test_every_file_a_stage_reads_belongs_to_one_input_partition(project):
    manifest, translator, _, graph = project
    catalog = translator.get_inputs(manifest)
    owners = catalog.owners()
    read = files_read(manifest)
    assert any(read.values())
    for item, files in read.items():
        for f in files:
            holders = [o for path, o in owners.items() if contains(path, f)]
            assert len(holders) == 1, f"{item} reads {f}: held by {holders}"
    # the spec's categories and the prompts are partitioned exactly like the stages that read them per category
    stage_parts = graph.get(dg.AssetKey("spec_chunks")).partitions_def
    assert graph.get(dg.AssetKey("spec_categories")).partitions_def is stage_parts
    assert graph.get(dg.AssetKey("prompts")).partitions_def is graph.get(dg.AssetKey("raw_cots")).partitions_def
    assert catalog.sources["spec_categories"].path("violence") == "data/spec/categories/violence.md"
    for name in ("spec_overview", "spec_styles", "evals_refusal_gold", "evals_harmful"):
        node = graph.get(dg.AssetKey(name))
        assert node.is_external and node.is_observable and node.partitions_def is None


def test_graph_wires_exactly_the_input_partitions_each_item_reads(project):
    manifest, translator, _, graph = project
    catalog = translator.get_inputs(manifest)
    read = files_read(manifest)
    input_keys = {translator.get_input_asset_key(s): s for s in catalog.sources.values()}
    for name, item in manifest.items.items():
        key = translator.get_asset_key(manifest.stages[item.stage])
        wired = set()
        for parent in graph.get(key).parent_keys:
            if parent not in input_keys:
                continue
            source = input_keys[parent]
            if source.keys is None:
                wired.add((parent.to_user_string(), None))
            else:
                subset = graph.get_parent_partition_keys_for_child(item.key, parent, key).partitions_subset
                wired |= {(parent.to_user_string(), p) for p in subset.get_partition_keys()}
        needed = {catalog.owner_of(f) for f in read[name]}
        assert wired == needed, f"{name}: wired {sorted(wired - needed, key=str)} extra, " \
                                f"{sorted(needed - wired, key=str)} missing"
    # one category's policy feeds that category's spec chunk only, among the stages over the categories
    categories = graph.get(dg.AssetKey("spec_categories")).partitions_def
    children = graph.get_children_partitions(dg.AssetKey("spec_categories"), "violence")
    assert {(c.asset_key.to_user_string(), c.partition_key) for c in children
            if graph.get(c.asset_key).partitions_def is categories} == {("spec_chunks", "violence")}


def test_observing_an_input_gives_dvcs_md5(project, tmp_path):
    manifest, translator, defs, _ = project
    observers = [a for a in defs.assets if isinstance(a, dg.AssetsDefinition) and a.is_observable]
    assert observers and all(not a.is_materializable for a in observers)
    with dg.DagsterInstance.ephemeral() as instance:
        dg.materialize(observers, selection=[dg.AssetKey("spec_categories")], partition_key="violence",
                       instance=instance)
        dg.materialize(observers, selection=[dg.AssetKey("spec_styles"), dg.AssetKey("spec_overview")],
                       instance=instance)
        got = {}
        for key, partition in (("spec_categories", "violence"), ("spec_styles", None), ("spec_overview", None)):
            flt = dg.AssetRecordsFilter(asset_key=dg.AssetKey(key), asset_partitions=[partition] if partition else None)
            record = instance.fetch_observations(flt, limit=1).records[0]
            got[key] = record.event_log_entry.tags["dagster/data_version"]
    assert got["spec_categories"] == hashlib.md5((ROOT / "data/spec/categories/violence.md").read_bytes()).hexdigest()
    assert got["spec_styles"] == dvc_md5(ROOT / "data/spec/styles") and got["spec_styles"].endswith(".dir")
    assert got["spec_overview"] == hashlib.md5((ROOT / "data/spec/overview.md").read_bytes()).hexdigest()


def test_discovery_in_a_small_project_of_its_own(tmp_path):
    """A key that also appears in an unrelated path, a read-whole directory with files no stage names, a file of a
    key that is not in the foreach list: each file still gets one input, and the mappings follow the item edges."""
    files = {"in/cat/a.txt": "A", "in/cat/b.txt": "B", "in/cat/c.txt": "C (no stage item for c)",
             "in/common.txt": "shared", "in/extra/notes.md": "read only by merge", "in/a_only.txt": "for item a"}
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    dvc_yaml = {"stages": {
        "chunk": {"foreach": ["a", "b"], "do": {"cmd": "cat in/cat/${item}.txt > out/${item}.txt",
                                                "deps": ["in/cat/${item}.txt", "in/common.txt", "in/a_only.txt"],
                                                "outs": ["out/${item}.txt"]}},
        "merge": {"cmd": "cat out/* > merged.txt", "deps": ["out", "in"], "outs": ["merged.txt"]},
    }}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    translator = DagsterDvcTranslator()
    manifest = DvcManifest.load(tmp_path)
    catalog = translator.get_inputs(manifest)
    assert {n: (s.pattern, s.keys) for n, s in catalog.sources.items()} == {
        "in_cat": ("in/cat/{key}.txt", ("a", "b")), "in_a_only": ("in/a_only.txt", None),
        "in_cat_c": ("in/cat/c.txt", None), "in_common": ("in/common.txt", None), "in_extra": ("in/extra", None)}
    specs = {s.key.to_user_string(): s for a in build_definitions(tmp_path, translator=translator).assets
             for s in a.specs}
    deps = {name: {d.asset_key.to_user_string(): d.partition_mapping for d in spec.deps}
            for name, spec in specs.items() if name in ("chunk", "merge")}
    assert set(deps["chunk"]) == {"in_cat", "in_common", "in_a_only"}
    assert isinstance(deps["chunk"]["in_cat"], dg.IdentityPartitionMapping)
    assert set(deps["merge"]) == {"chunk", "in_cat", "in_cat_c", "in_common", "in_extra", "in_a_only"}
    assert isinstance(deps["merge"]["in_cat"], dg.AllPartitionMapping)
    assert specs["in_cat"].partitions_def is specs["chunk"].partitions_def


def test_directory_md5s_equal_dvcs_where_string_and_part_order_differ(tmp_path):
    """"a-b/x" sorts before "a/b" as a string but after it by path parts: every digest must order as DVC does."""
    import subprocess
    import sys

    import yaml

    from dagster_project.audit import dvc_md5 as audit_md5
    from dagster_project.inputs import dvc_md5 as input_md5
    from pipelines.model_card import dvc_md5 as card_md5

    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*dvc, "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "t/a").mkdir(parents=True)
    (tmp_path / "t/a-b").mkdir()
    (tmp_path / "t/a/b").write_text("1")
    (tmp_path / "t/a-b/x").write_text("2")
    subprocess.run([*dvc, "add", "-q", "t"], cwd=tmp_path, check=True)
    want = yaml.safe_load((tmp_path / "t.dvc").read_text())["outs"][0]["md5"]
    assert input_md5(tmp_path, "t") == want
    assert audit_md5(tmp_path / "t") == want
    assert card_md5(tmp_path / "t") == want
