"""dagster_project over real DVC: temp git+DVC repos (fake generator, tiny local base model, 3 categories), built like
tests/test_dvc_pipeline.py. The asset graph is compared with `dvc dag`, runs go through real `dvc repro`, and the
plan/audit CLIs read real `dvc status`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dagster as dg
import pytest
import yaml

from conftest import ROOT, fake_params
from tiny_model import make_tiny_model

from dagster_project.build import build_definitions
from dagster_project.checks import jsonl_schema, keep_rate_in_bounds, spec_free_prompts
from dagster_project.dvc_cli import run_dvc
from dagster_project.manifest import DvcManifest
from dagster_project.plan import plan
from dagster_project.resource import DvcCliResource
from dagster_project.sensors import request_summary

SPINE = ["base_model", "refusal_classifier", "spec_chunks", "raw_cots", "judged_cots", "sft_dataset"]
CATEGORIES = ["erotic", "harassment", "violence"]  # a subset keeps a full `dvc repro` near 20 s
PER_CATEGORY = ["spec_chunks", "raw_cots", "judged_cots"]


# ------------------------------------------------------------------------------------------------ helpers
def sh(cmd: str, cwd: Path, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}
    e.update({"PYTHONPATH": str(ROOT), "DVC_NO_ANALYTICS": "1", **(env or {})})
    e["PATH"] = str(Path(sys.executable).parent) + os.pathsep + e.get("PATH", "")
    proc = subprocess.run(cmd, cwd=cwd, env=e, shell=True, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc


def make_repo(d: Path) -> Path:
    """Spine stages of the real dvc.yaml, the real pipelines/ + spec + prompts + labelled sets, fake generator,
    3 categories."""
    for sub in ("pipelines", "data/spec", "data/prompts", "data/evals"):
        shutil.copytree(ROOT / sub, d / sub, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".gitignore", d / ".gitignore")
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    (d / "dvc.yaml").write_text(yaml.safe_dump({"stages": {k: stages[k] for k in SPINE}}, sort_keys=False))
    make_tiny_model(d / "tiny_base")
    p = fake_params()
    p["categories"] = list(CATEGORIES)
    p["base_model"]["local_path"] = "tiny_base"
    (d / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    sh("git init -q && git config user.email t@t && git config user.name t && dvc init -q", d)
    sh("git add -A && git commit -qm init", d)
    return d


def copy_repo(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def dagster_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return sh(f"{sys.executable} -m dagster_project " + " ".join(args), cwd, check=False)


@pytest.fixture(scope="module")
def fresh_repo(tmp_path_factory) -> Path:
    """Never reproduced (no dvc.lock); copy it before running anything in it."""
    return make_repo(tmp_path_factory.mktemp("fresh"))


@pytest.fixture(scope="module")
def reproduced_repo(tmp_path_factory, fresh_repo) -> Path:
    """`dvc repro` of the whole spine, everything (dvc.lock, metrics, DVC's .gitignore files) committed."""
    d = copy_repo(fresh_repo, tmp_path_factory.mktemp("repro") / "repo")
    sh("dvc repro -q", d)
    sh("git add -A && git commit -qm repro", d)
    return d


def dvc_dag_edges(repo: Path, collapse: bool) -> set:
    out = sh("dvc dag --dot" + (" --collapse-foreach-matrix" if collapse else ""), repo).stdout
    return set(re.findall(r'"([^"]+)" -> "([^"]+)"', out))


# ------------------------------------------------------------------------------------------------ the asset graph
def test_asset_graph_equals_dvc_dag(fresh_repo):
    defs = build_definitions(fresh_repo)
    graph = defs.resolve_asset_graph()
    stages = graph.materializable_asset_keys  # the rest are the input files (tests/test_dagster_inputs.py)
    keys = {k.to_user_string() for k in stages}
    assert keys == set(SPINE)

    # stage-level edges as DVC draws them, item-level edges as DVC resolves them
    asset_edges = {(p.to_user_string(), k.to_user_string()) for k in stages
                   for p in graph.get(k).parent_keys if p in stages}
    assert asset_edges == dvc_dag_edges(fresh_repo, collapse=True)
    manifest = DvcManifest.load(fresh_repo)
    item_edges = {(u, n) for n in manifest.items for u in manifest.upstream_items(n)}
    assert item_edges == dvc_dag_edges(fresh_repo, collapse=False)

    categories = yaml.safe_load((fresh_repo / "params.yaml").read_text())["categories"]
    for name in PER_CATEGORY:
        assert graph.get(dg.AssetKey(name)).partitions_def.get_partition_keys() == categories
    for name in ("base_model", "sft_dataset"):
        assert graph.get(dg.AssetKey(name)).partitions_def is None

    # the merged dataset needs every category; a category's judged_cots needs the same category's raw_cots
    spec = {s.key.to_user_string(): s for a in defs.assets for s in a.specs}
    mapping = {(d.asset_key.to_user_string(), name): d.partition_mapping for name, s in spec.items() for d in s.deps}
    assert isinstance(mapping[("judged_cots", "sft_dataset")], dg.AllPartitionMapping)
    assert isinstance(mapping[("raw_cots", "judged_cots")], dg.IdentityPartitionMapping)
    assert mapping[("base_model", "raw_cots")] is None
    # one multi-asset per partitions definition, subsettable, in the single-slot DVC pool
    dvc_defs = [a for a in defs.assets if a.is_materializable]
    assert len(dvc_defs) == 2
    for a in dvc_defs:
        assert a.can_subset and a.op.pool == "dvc"
    checks = {f"{k.asset_key.to_user_string()}:{k.name}" for a in defs.assets for k in a.check_keys}
    assert {"raw_cots:schema_nonempty", "judged_cots:keep_rate_in_bounds", "sft_dataset:spec_free_prompts",
            "base_model:loads_and_generates"} <= checks
    assert {j.name for j in defs.resolve_all_job_defs()} >= {"full_pipeline", "data_only"}
    assert spec["raw_cots"].code_version and spec["raw_cots"].group_name == "data"
    assert spec["spec_chunks"].group_name == "spec"

    # stages can be split over several multi-assets (e.g. training on its own op for GPU placement)
    from dagster_project import dvc_assets

    split = dvc_assets(manifest, select=["sft_dataset"], name="dvc_merge") + dvc_assets(manifest, exclude=["sft_dataset"])
    assert sorted(a.op.name for a in split) == ["dvc_categories", "dvc_merge_stages", "dvc_stages"]
    dg.Definitions(assets=split, resources={"dvc": DvcCliResource(project_dir=str(fresh_repo))}).resolve_all_job_defs()
    with pytest.raises(ValueError, match="not a dvc.yaml stage"):
        dvc_assets(manifest, select=["no_such_stage"])


def test_new_category_and_new_stage_need_no_code_change(fresh_repo, tmp_path):
    repo = copy_repo(fresh_repo, tmp_path / "repo")
    before = build_definitions(repo).resolve_asset_graph()
    code_before = before.get(dg.AssetKey("raw_cots")).code_version

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["categories"].append("self_harm")
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc_yaml = yaml.safe_load((repo / "dvc.yaml").read_text())
    dvc_yaml["stages"]["dataset_card"] = {
        "cmd": "python -c \"print('card')\" > data/dataset_card.md",
        "deps": ["data/sft_dataset"],
        "outs": ["data/dataset_card.md"],
        "meta": {"dagster": {"group": "reporting"}},  # a dvc.yaml-side override read by the default translator
    }
    (repo / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))

    after = build_definitions(repo).resolve_asset_graph()
    for name in PER_CATEGORY:
        assert after.get(dg.AssetKey(name)).partitions_def.get_partition_keys() == CATEGORIES + ["self_harm"]
    card = after.get(dg.AssetKey("dataset_card"))
    assert [k.to_user_string() for k in card.parent_keys] == ["sft_dataset"]
    assert card.partitions_def is None and card.group_name == "reporting"
    # the category list is data, not code: adding one leaves the existing partitions' code version alone
    assert after.get(dg.AssetKey("raw_cots")).code_version == code_before


def test_code_version_follows_code_params_and_command(fresh_repo, tmp_path):
    repo = copy_repo(fresh_repo, tmp_path / "repo")

    def versions():
        g = build_definitions(repo).resolve_asset_graph()
        return {k.to_user_string(): g.get(k).code_version for k in g.get_all_asset_keys()}

    v0 = versions()
    with (repo / "pipelines/judged_cots.py").open("a") as f:
        f.write("\n# a comment is a code change\n")
    v1 = versions()
    # exactly the stages whose command imports the file (dvc.yaml lists every imported project file,
    # tests/test_code_deps.py): judged_cots only. sft_dataset reads its out, and takes the path from pipelines/catalog.py
    assert {k for k in v0 if v0[k] != v1[k]} == {"judged_cots"}
    with (repo / "pipelines/catalog.py").open("a") as f:
        f.write("\n# every stage imports the catalog\n")
    v_cat = versions()
    stages = {k for k, v in v1.items() if v is not None}  # the DVC stages; input assets have no code version
    assert {"judged_cots", "sft_dataset", "raw_cots"} <= stages
    assert {k for k in v1 if v1[k] != v_cat[k]} == stages
    v1 = v_cat
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["raw_cots"]["n_samples"] = 3
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    v2 = versions()
    assert {k for k in v1 if v1[k] != v2[k]} == {"raw_cots"}


# ------------------------------------------------------------------------------------------------ running
@pytest.mark.slow
def test_materialize_one_category_partition(fresh_repo, tmp_path):
    repo = copy_repo(fresh_repo, tmp_path / "repo")
    defs = build_definitions(repo)
    home = tmp_path / "dagster_home"
    home.mkdir()
    with dg.DagsterInstance.from_config(str(home)) as instance:
        result = dg.materialize(
            list(defs.assets), selection=["base_model", "refusal_classifier", *PER_CATEGORY], partition_key="violence",
            instance=instance,
            resources={"dvc": DvcCliResource(project_dir=str(repo))})
        logged = [e.user_message for e in instance.all_logs(result.run_id)]
    assert result.success
    assert "Running stage 'raw_cots@violence':" in logged  # DVC's own output, line by line, in the run log

    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert set(lock) == {"base_model", "refusal_classifier", "spec_chunks@violence", "raw_cots@violence",
                         "judged_cots@violence"}
    mats = {(m.asset_key.to_user_string(), m.partition): m for m in
            (e.event_specific_data.materialization for e in result.get_asset_materialization_events())}
    assert set(mats) == {("base_model", None), ("refusal_classifier", None)} | {(s, "violence") for s in PER_CATEGORY}
    for (stage, part), m in mats.items():
        item = f"{stage}@{part}" if part else stage
        outs = [o for o in lock[item]["outs"] if not o["path"].startswith("data/metrics/")]
        assert m.tags["dagster/data_version"] == outs[0]["md5"]
        assert m.metadata["dvc/reused"].value is False
    rows = sum(1 for ln in (repo / "data/judged_cots/violence.jsonl").read_text().splitlines() if ln.strip())
    assert mats[("judged_cots", "violence")].metadata["rows"].value == rows
    metrics = json.loads((repo / "data/metrics/judged_cots/violence.json").read_text())
    assert mats[("judged_cots", "violence")].metadata["keep_rate"].value == metrics["keep_rate"]
    checks = {(c.asset_key.to_user_string(), c.check_name, c.partition): c.passed
              for c in result.get_asset_check_evaluations()}
    assert checks[("judged_cots", "keep_rate_in_bounds", "violence")] is True
    assert checks[("base_model", "loads_and_generates", None)] is True

    # a second run of an unchanged item: DVC skips it, Dagster records the same data version and says it was reused
    with dg.DagsterInstance.from_config(str(home)) as instance:
        again = dg.materialize(list(defs.assets), selection=["spec_chunks"], partition_key="violence",
                               instance=instance, resources={"dvc": DvcCliResource(project_dir=str(repo))})
    (m,) = [e.event_specific_data.materialization for e in again.get_asset_materialization_events()]
    assert m.metadata["dvc/reused"].value is True
    assert m.tags["dagster/data_version"] == mats[("spec_chunks", "violence")].tags["dagster/data_version"]

    # Dagster's records agree with dvc.lock, as the audit sees them
    from dagster_project.audit import audit

    rows = {(r["check"], r["status"]) for r in audit(repo, dagster_home=str(home))["rows"]}
    assert ("dagster data versions", "PASS") in rows and ("dagster asset checks", "PASS") in rows
    assert ("stage spec_chunks@erotic", "FAIL") in rows  # the categories not run are reported, not hidden


def test_failed_blocking_check_stops_downstream_items(fresh_repo, tmp_path):
    """A translator hook adds a blocking check that fails on spec_chunks: raw_cots of that partition must not run."""
    from dagster_project import CheckOutcome, DagsterDvcTranslator, DvcCheck

    class Strict(DagsterDvcTranslator):
        def get_checks(self, stage):
            extra = [DvcCheck("too_short", "chunk has at least 10^6 characters", blocking=True,
                              fn=lambda m, item: CheckOutcome(False, "chunk is short",
                                                              {"chars": 1, "min_chars": 10 ** 6}))]
            return super().get_checks(stage) + (extra if stage.name == "spec_chunks" else [])

    repo = copy_repo(fresh_repo, tmp_path / "repo")
    defs = build_definitions(repo, translator=Strict())
    result = dg.materialize(list(defs.assets), selection=["spec_chunks", "raw_cots"], partition_key="erotic",
                            resources={"dvc": DvcCliResource(project_dir=str(repo))}, raise_on_error=False)
    assert not result.success
    mats = [e.event_specific_data.materialization.asset_key.to_user_string()
            for e in result.get_asset_materialization_events()]
    assert mats == ["spec_chunks"]
    (check,) = [c for c in result.get_asset_check_evaluations() if c.check_name == "too_short"]
    assert not check.passed and check.metadata["min_chars"].value == 10 ** 6
    assert set(yaml.safe_load((repo / "dvc.lock").read_text())["stages"]) == {"spec_chunks@erotic"}


def test_costly_check_pass_is_reused_until_the_lock_changes(fresh_repo, tmp_path):
    """A cacheable check that passed is not run again while the item's dvc.lock record stays the same; a failure is
    always evaluated again; a new lock record (another base model here) runs it afresh."""
    from dagster_project import CheckOutcome, DagsterDvcTranslator, DvcCheck

    calls = {"pass": 0, "fail": 0}

    def counted(result: bool):
        def fn(manifest, item):
            calls["pass" if result else "fail"] += 1
            return CheckOutcome(result, "counted", {"calls": calls["pass" if result else "fail"]})
        return fn

    class Counting(DagsterDvcTranslator):
        def get_checks(self, stage):
            extra = [DvcCheck("counted_pass", "passes", counted(True), cacheable=True),
                     DvcCheck("counted_fail", "fails", counted(False), cacheable=True)]
            return super().get_checks(stage) + (extra if stage.name == "base_model" else [])

    repo = copy_repo(fresh_repo, tmp_path / "repo")

    def run() -> dict:
        defs = build_definitions(repo, translator=Counting())
        result = dg.materialize(list(defs.assets), selection=["base_model"], raise_on_error=False,
                                resources={"dvc": DvcCliResource(project_dir=str(repo))})
        return {c.check_name: c for c in result.get_asset_check_evaluations()}

    first = run()
    assert calls == {"pass": 1, "fail": 1} and first["loads_and_generates"].passed
    assert "cached" not in first["loads_and_generates"].metadata
    second = run()
    assert calls == {"pass": 1, "fail": 2}  # the pass was reused, the failure evaluated again
    assert second["counted_pass"].passed and second["counted_pass"].metadata["cached"].value is True
    assert second["loads_and_generates"].metadata["cached"].value is True
    assert second["loads_and_generates"].metadata["parameters"] == first["loads_and_generates"].metadata["parameters"]

    make_tiny_model(repo / "tiny_other", seed=7)  # another base model: DVC reruns the stage, the md5 changes
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["base_model"]["local_path"] = "tiny_other"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = run()
    assert calls == {"pass": 2, "fail": 3} and "cached" not in third["loads_and_generates"].metadata


@pytest.mark.slow
def test_full_pipeline_job_records_every_item(reproduced_repo, tmp_path):
    """The op job walks all items upstream first; here all are up to date, so DVC reuses every one of them."""
    repo = copy_repo(reproduced_repo, tmp_path / "repo")
    defs = build_definitions(repo)
    home = tmp_path / "dagster_home"
    home.mkdir()
    with dg.DagsterInstance.from_config(str(home)) as instance:
        result = defs.resolve_job_def("full_pipeline").execute_in_process(instance=instance)
    assert result.success
    manifest = DvcManifest.load(repo)
    mats = {(m.asset_key.to_user_string(), m.partition): m for m in
            (e.event_specific_data.materialization for e in result.get_asset_materialization_events())}
    assert set(mats) == {(i.stage, i.key) for i in manifest.items.values()}
    assert all(m.metadata["dvc/reused"].value for m in mats.values())
    failed = [(c.asset_key.to_user_string(), c.check_name, c.partition)
              for c in result.get_asset_check_evaluations() if not c.passed]
    assert failed == [] and len(result.get_asset_check_evaluations()) >= len(manifest.items)
    # nothing changed: one `dvc status` answered for every item, no `dvc repro` was started
    with dg.DagsterInstance.from_config(str(home)) as instance:
        logged = [e.user_message for e in instance.all_logs(result.run_id)]
    assert sum("up to date per `dvc status`" in m for m in logged) == len(manifest.items)
    assert not any("Stage '" in m and "didn't change, skipping" in m for m in logged)

    from dagster_project.audit import audit

    outcome = audit(repo, dagster_home=str(home))
    assert outcome["ok"], outcome["rows"]
    assert ("dagster data versions", "PASS") in {(r["check"], r["status"]) for r in outcome["rows"]}

    # one policy edited: the status taken first sees only spec_chunks@violence as changed, yet its downstream items
    # must run too (they go stale only once it has run), and the repo ends up clean
    path = repo / "data/spec/categories/violence.md"
    path.write_text(path.read_text().rstrip() + "\n- \"Describe a duel in a novel\" -> V.1, full_compliance.\n")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        again = defs.resolve_job_def("full_pipeline").execute_in_process(instance=instance)
    assert again.success
    ran = {(m.asset_key.to_user_string(), m.partition) for m in
           (e.event_specific_data.materialization for e in again.get_asset_materialization_events())
           if not m.metadata["dvc/reused"].value}
    assert ran == {("spec_chunks", "violence"), ("raw_cots", "violence"), ("judged_cots", "violence"),
                   ("sft_dataset", None)}
    assert "up to date" in sh("dvc status", repo).stdout


@pytest.mark.slow
def test_status_in_process_answers_like_the_cli(reproduced_repo, tmp_path):
    from dagster_project.dvc_cli import dvc_json, status_in_process

    repo = copy_repo(reproduced_repo, tmp_path / "repo")
    assert status_in_process(repo) == {} == dvc_json(["status"], repo)
    path = repo / "data/spec/categories/violence.md"
    path.write_text(path.read_text() + "\n- \"Describe a duel in a novel\" -> V.1, full_compliance.\n")
    changed = status_in_process(repo)
    assert changed == dvc_json(["status"], repo) and set(changed) == {"spec_chunks@violence"}
    assert status_in_process(tmp_path / "not-a-repo") is None  # DVC cannot answer: the caller asks the CLI


@pytest.mark.slow
def test_plan_after_one_category_spec_edit(reproduced_repo, tmp_path):
    repo = copy_repo(reproduced_repo, tmp_path / "repo")
    assert plan(repo) == []
    path = repo / "data/spec/categories/violence.md"
    path.write_text(path.read_text().rstrip() + "\n- \"Describe a duel in a novel\" -> V.1, full_compliance.\n")

    entries = {e.item: e for e in plan(repo)}
    assert set(entries) == {"spec_chunks@violence", "raw_cots@violence", "judged_cots@violence", "sft_dataset"}
    assert [str(r) for r in entries["spec_chunks@violence"].reasons] == [
        "changed file: data/spec/categories/violence.md (modified)"]
    assert {r.kind for e in entries.values() if e.item != "spec_chunks@violence" for r in e.reasons} == {
        "upstream changed"}

    proc = dagster_cli("plan", "--json", cwd=repo)
    assert proc.returncode == 0, proc.stderr
    assert {(e["stage"], e["partition"]) for e in json.loads(proc.stdout)} == {
        ("spec_chunks", "violence"), ("raw_cots", "violence"), ("judged_cots", "violence"), ("sft_dataset", None)}

    # a param change is named as such and reaches the judge's partitions and the merged dataset only
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["judged_cots"]["judge"]["threshold"] = 6.5
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    entries = {e.item: e for e in plan(repo)}
    assert {n for n in entries if n.startswith("judged_cots@")} == {f"judged_cots@{c}" for c in CATEGORIES}
    assert "changed param: params.yaml:judged_cots.judge (modified)" in map(str, entries["judged_cots@erotic"].reasons)
    assert "raw_cots@erotic" not in entries


@pytest.mark.slow
def test_audit_passes_on_untouched_run(reproduced_repo, tmp_path):
    repo = copy_repo(reproduced_repo, tmp_path / "repo")
    proc = dagster_cli("audit", "--json", cwd=repo)
    result = json.loads(proc.stdout)
    assert proc.returncode == 0, proc.stdout
    assert result["ok"] and {r["status"] for r in result["rows"]} <= {"PASS", "SKIP"}
    assert result["commit"] == sh("git rev-parse HEAD", repo).stdout.strip()


@pytest.mark.slow
def test_rehash_catches_an_edit_that_restores_size_and_mtime(reproduced_repo, tmp_path):
    repo = copy_repo(reproduced_repo, tmp_path / "repo")
    proc = dagster_cli("audit", "--rehash", "--no-dagster", cwd=repo)
    assert proc.returncode == 0 and re.search(r"PASS\s+outs rehashed", proc.stdout), proc.stdout
    sh("dvc status", repo)  # DVC records inode/mtime/size of every out in its state cache now
    path = repo / "data/judged_cots/erotic.jsonl"
    st = path.stat()
    data = bytearray(path.read_bytes())
    i = data.index(b'"kept": false') if b'"kept": false' in data else data.index(b"e")
    data[i:i + 13] = b'"kept": true ' if data[i:i + 13] == b'"kept": false' else data[i:i + 1].upper() + data[i + 1:i + 13]
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: only the bytes changed
    assert path.stat().st_size == st.st_size
    proc = dagster_cli("audit", "--rehash", "--no-dagster", cwd=repo)
    assert proc.returncode == 1, proc.stdout
    assert re.search(r"FAIL\s+out data/judged_cots/erotic\.jsonl \(rehash\)\s+bytes hash to", proc.stdout), proc.stdout


@pytest.mark.slow
def test_audit_fails_naming_a_tampered_and_a_missing_out(reproduced_repo, tmp_path):
    repo = copy_repo(reproduced_repo, tmp_path / "repo")
    with (repo / "data/judged_cots/erotic.jsonl").open("a") as f:
        f.write(json.dumps({"id": "forged", "kept": True}) + "\n")
    proc = dagster_cli("audit", cwd=repo)
    assert proc.returncode == 1
    assert re.search(r"FAIL\s+out data/judged_cots/erotic\.jsonl\s+content differs", proc.stdout), proc.stdout
    assert "git tree clean" in proc.stdout and "FAIL  git" not in proc.stdout  # DVC outs are git-ignored

    (repo / "data/spec_chunks/harassment.md").unlink()
    proc = dagster_cli("audit", "--json", cwd=repo)
    failing = {r["check"]: r["detail"] for r in json.loads(proc.stdout)["rows"] if r["status"] == "FAIL"}
    assert proc.returncode == 1
    assert failing["out data/spec_chunks/harassment.md"].startswith("missing")
    assert "out data/judged_cots/erotic.jsonl" in failing


@pytest.mark.slow
def test_audit_fails_on_params_not_in_lock_and_dirty_git(reproduced_repo, tmp_path):
    repo = copy_repo(reproduced_repo, tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["sft_dataset"]["max_per_prompt"] = 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = dagster_cli("audit", "--json", cwd=repo)
    failing = {r["check"]: r["detail"] for r in json.loads(proc.stdout)["rows"] if r["status"] == "FAIL"}
    assert proc.returncode == 1
    assert "params.yaml" in failing["git tree clean"]
    assert "sft_dataset.max_per_prompt" in failing["params match dvc.lock"] or \
        "params.yaml:sft_dataset" in failing["params match dvc.lock"]


# ------------------------------------------------------------------------------------------------ sensor, CLI, checks
def test_spec_sensor_requests_only_affected_partitions(fresh_repo, tmp_path):
    repo = copy_repo(fresh_repo, tmp_path / "repo")
    sensor = build_definitions(repo).resolve_sensor_def("spec_change_sensor")
    assert sensor.default_status == dg.DefaultSensorStatus.STOPPED

    first = dg.build_sensor_context(cursor=None)
    assert isinstance(sensor(first), dg.SkipReason)
    cursor = first.cursor
    idle = dg.build_sensor_context(cursor=cursor)
    assert isinstance(sensor(idle), dg.SkipReason)

    (repo / "data/spec/categories/harassment.md").write_text(
        (repo / "data/spec/categories/harassment.md").read_text() + "\nOne more worked case.\n")
    ctx = dg.build_sensor_context(cursor=cursor)
    assert request_summary(sensor(ctx)) == [("harassment", PER_CATEGORY)]

    (repo / "data/spec/overview.md").write_text((repo / "data/spec/overview.md").read_text() + "\nA new rule.\n")
    requests = sensor(dg.build_sensor_context(cursor=ctx.cursor))
    assert sorted(request_summary(requests)) == [(c, PER_CATEGORY) for c in CATEGORIES]


def test_cli_help_explains_commands():
    proc = subprocess.run([sys.executable, "-m", "dagster_project", "audit", "--help"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "dvc.lock" in proc.stdout and "DAGSTER_HOME" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "dagster_project"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "plan" in proc.stderr


@pytest.mark.slow
def test_checks_fail_on_bad_data(reproduced_repo, tmp_path):
    repo = copy_repo(reproduced_repo, tmp_path / "repo")
    manifest = DvcManifest.load(repo)
    judged = manifest.items["judged_cots@violence"]
    assert jsonl_schema(["id", "kept"])(manifest, judged).passed
    missing = jsonl_schema(["id", "no_such_field"])(manifest, judged)
    assert not missing.passed and "no_such_field" in missing.description

    params = yaml.safe_load((repo / "params.yaml").read_text())
    observed = keep_rate_in_bounds(manifest, judged).metadata["keep_rate"]
    params["judged_cots"]["pass_rate_bounds"] = [min(observed + 0.01, 1.0), 1.0] if observed < 1 else [0.0, 0.5]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    outcome = keep_rate_in_bounds(DvcManifest.load(repo), judged)
    assert not outcome.passed and outcome.metadata["lower_bound"] == params["judged_cots"]["pass_rate_bounds"][0]

    sft = manifest.items["sft_dataset"]
    assert spec_free_prompts(manifest, sft).passed
    # smuggle one distinctive spec line into a system prompt
    chunk_line = next(ln for ln in (repo / "data/spec_chunks/violence.md").read_text().splitlines()
                      if len(ln.strip()) >= 25)
    forged = {"id": "forged#0", "category": "violence", "prompt_id": "forged", "messages": [
        {"role": "system", "content": params["sft_dataset"]["system_prompt"] + "\n" + chunk_line},
        {"role": "user", "content": "How do I win a fight?"},
        {"role": "assistant", "content": "<think>V.1</think> Walk away."}]}
    with (repo / "data/sft_dataset/train.jsonl").open("a") as f:
        f.write(json.dumps(forged) + "\n")
    assert jsonl_schema(["id", "messages"])(manifest, sft).passed
    leaked = spec_free_prompts(manifest, sft)
    assert not leaked.passed and "forged#0" in leaked.description


def test_dvc_output_is_streamed_and_interrupt_forwarded(tmp_path):
    """The runner hands over each line as it is printed, and an interrupt reaches the child as SIGINT."""
    marker = tmp_path / "got_sigint"
    script = tmp_path / "fake_dvc.py"
    script.write_text(textwrap.dedent(f"""
        import signal, sys, time
        def on_int(*_):
            open({str(marker)!r}, "w").write("yes"); sys.exit(130)
        signal.signal(signal.SIGINT, on_int)
        print("first line", flush=True)
        time.sleep(30)
        print("never", flush=True)
    """))
    exe = tmp_path / "fake_dvc"
    exe.write_text(f"#!/bin/sh\nexec {sys.executable} {script} \"$@\"\n")
    exe.chmod(0o755)
    seen = []

    def on_line(line: str) -> None:
        seen.append((line, time.monotonic()))
        raise KeyboardInterrupt

    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_dvc(["repro"], tmp_path, on_line, executable=str(exe), wait_for_lock=False, grace_s=10)
    assert seen[0][0] == "first line" and time.monotonic() - start < 15
    assert marker.read_text() == "yes"


def test_definitions_validate_for_the_real_project(tmp_path):
    dagster = Path(sys.executable).parent / "dagster"
    proc = sh(f"{dagster} definitions validate -m dagster_project.definitions", ROOT, check=False,
              env={"DAGSTER_HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Validation successful" in proc.stderr + proc.stdout


def test_dagster_configs_parse_and_pool_limit_is_one(fresh_repo, tmp_path):
    cfg_dir = ROOT / "configs/dagster"
    files = sorted(cfg_dir.glob("*.yaml"))
    assert {f.name for f in files} >= {"dagster.yaml", "run_multiprocess.yaml", "run_k8s.yaml", "run_celery.yaml",
                                       "run_docker.yaml"}
    for f in files:
        data = yaml.safe_load(f.read_text())
        assert isinstance(data, dict) and data, f
        assert f.read_text().lstrip().startswith("#"), f"{f.name} should say what it is for"
    # the instance file is valid instance config and gives the DVC pool one slot
    shutil.copy(cfg_dir / "dagster.yaml", tmp_path / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 1
    # the local run config is valid for the default executor of the real definitions
    job = build_definitions(fresh_repo).resolve_job_def("data_only")
    dg.validate_run_config(job, yaml.safe_load((cfg_dir / "run_multiprocess.yaml").read_text()))
