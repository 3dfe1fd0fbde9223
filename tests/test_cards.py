"""Cards: lineage logic on a small dvc.lock; the model card a training stage writes inside its checkpoint (md5s of
what it names, same bytes on a rewrite); the model card with evaluation, written only to the cards output; dvc.yaml's
card stages and artifacts; then dataset and model cards of real tiny `dvc repro` runs."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from dvc_repo import CATEGORIES, dvc_md5, ran_stages, read_lock, reproduced_spine, sh
from pipelines.cards import (DATASET_STAGES, build_card, compose_model_card, eval_rows, metrics_paths, producers,
                             read_table, source_state, split_key, upstream, write_model_card_dir)
from pipelines.errors import PipelineError
from pipelines.model_card import card_inputs, model_card, read_card, split_front_matter, write_model_card


# ---------------------------------------------------------------------------- pure lineage logic
def _o(path, text):
    return {"path": path, "hash": "md5", "md5": hashlib.md5(text).hexdigest(), "size": len(text)}


SPEC = b"# spec of a\n"
M_RAW, M_JUDGED, M_EVAL_SFT = b'{"n": 4}', b'{"keep_rate": 0.5}', b'{"not_unsafe": 0.9}'
LOCK = {"schema": "2.0", "stages": {
    "base_model": {"cmd": "b", "deps": [_o("pipelines/base_model.py", b"x")],
                   "params": {"params.yaml": {"base_model": {"local_path": None}}},
                   "outs": [{**_o("data/base_model", b"m"), "md5": "aa.dir", "nfiles": 3}]},
    "spec_chunks@a": {"cmd": "s", "deps": [_o("data/spec/categories/a.md", b"a")],
                      "outs": [_o("data/spec_chunks/a.md", SPEC)]},
    "raw_cots@a": {"cmd": "r", "deps": [_o("data/base_model", b"m") | {"md5": "aa.dir"},
                                        _o("data/spec_chunks/a.md", SPEC)],
                   "params": {"params.yaml": {"raw_cots": {"sampling": {"seed": 3, "top_p": 1.0}}}},
                   "outs": [_o("data/raw_cots/a.jsonl", b"r"), _o("data/metrics/raw_cots/a.json", M_RAW)]},
    "judged_cots@a": {"cmd": "j", "deps": [_o("data/raw_cots/a.jsonl", b"r")],
                      "params": {"params.yaml": {"judged_cots.judge": {"threshold": 7}}},
                      "outs": [_o("data/judged_cots/a.jsonl", b"j"), _o("data/metrics/judged_cots/a.json", M_JUDGED)]},
    "sft_dataset": {"cmd": "d", "deps": [{**_o("data/judged_cots", b"J"), "md5": "jj.dir"}],
                    "outs": [{**_o("data/sft_dataset", b"D"), "md5": "dd.dir"}]},
    "sft_checkpoint": {"cmd": "t", "deps": [{**_o("data/sft_dataset", b"D"), "md5": "dd.dir"},
                                            {**_o("data/base_model", b"m"), "md5": "aa.dir"}],
                       "params": {"params.yaml": {"sft_checkpoint": {"seed": 11, "data_seed": 12}}},
                       "outs": [{**_o("data/sft_checkpoint", b"C"), "md5": "cc.dir"}]},
    "eval_scores@sft": {"cmd": "e", "deps": [{**_o("data/sft_checkpoint", b"C"), "md5": "cc.dir"}],
                        "outs": [_o("data/metrics/eval_scores/sft.json", M_EVAL_SFT)]},
}}
DVC_YAML = {"stages": {
    "raw_cots": {"foreach": "${categories}",
                 "do": {"metrics": [{"data/metrics/raw_cots/${item}.json": {"cache": False}}]}},
    "judged_cots": {"foreach": ["a"], "do": {"metrics": ["data/metrics/judged_cots/${item}.json"]}},
    "eval_scores": {"foreach": ["sft"], "do": {"metrics": ["data/metrics/eval_scores/${key}.json"]}},
}}
FILES = {"data/metrics/raw_cots/a.json": M_RAW, "data/metrics/judged_cots/a.json": M_JUDGED,
         "data/metrics/eval_scores/sft.json": M_EVAL_SFT}
CODE = {"git_commit": "0" * 40, "dirty": False, "dirty_paths": []}
METS = metrics_paths(DVC_YAML, LOCK["stages"])


def test_lineage_is_followed_through_directory_deps_upstream_first():
    prod = producers(LOCK["stages"])
    assert prod["sft_dataset"]["data/judged_cots"] == ["judged_cots@a"]  # a dir dep on a file out
    ups = upstream("sft_checkpoint", prod)
    assert set(ups) == {"base_model", "spec_chunks@a", "raw_cots@a", "judged_cots@a", "sft_dataset"}
    for k in ups:  # each stage comes after everything it depends on
        assert all(ups.index(u) < ups.index(k) for u in upstream(k, prod))


def test_lineage_record_names_lock_md5s_seeds_spec_and_metrics():
    c = build_card("sft_checkpoint", LOCK, metrics=METS, files=FILES, code=CODE, packages={"torch": "9.9"})
    assert c["outs"] == [{"path": "data/sft_checkpoint", "md5": "cc.dir", "size": 1}]
    assert c["seeds"] == {"raw_cots.sampling.seed": 3, "sft_checkpoint.seed": 11, "sft_checkpoint.data_seed": 12}
    assert c["spec"] == {"a": {"path": "data/spec_chunks/a.md", "md5": hashlib.md5(SPEC).hexdigest()}}
    assert {u["stage"]: u["outs"][0]["md5"] for u in c["upstream"]}["sft_dataset"] == "dd.dir"
    # metrics outs (per dvc.yaml, ${item} filled in) are quoted with their values, not listed as artifacts
    j = build_card("judged_cots@a", LOCK, metrics=METS, files=FILES, code=CODE, packages={})
    assert [o["path"] for o in j["outs"]] == ["data/judged_cots/a.jsonl"]
    assert j["metrics"]["data/metrics/judged_cots/a.json"]["values"] == {"keep_rate": 0.5}
    unread = build_card("judged_cots@a", LOCK, metrics=METS, files={}, code=CODE, packages={}, quote_metrics=False)
    assert unread["metrics"]["data/metrics/judged_cots/a.json"] == {"md5": hashlib.md5(M_JUDGED).hexdigest(),
                                                                     "values": None}


def test_dirty_means_changed_sources_not_what_the_run_itself_rewrote():
    code = {"git_commit": "1" * 40, "dirty": True,
            "dirty_paths": ["dvc.lock", "data/metrics/judged_cots/a.json", "data/base_model/config.json",
                            "params.yaml", "pipelines/judges.py"]}
    assert source_state(code, LOCK)["dirty_paths"] == ["params.yaml", "pipelines/judges.py"]
    only_outputs = {**code, "dirty_paths": ["dvc.lock", "data/metrics/raw_cots/a.json"]}
    assert source_state(only_outputs, LOCK)["dirty"] is False
    assert source_state({"git_commit": None, "dirty": None, "dirty_paths": []}, LOCK)["dirty"] is None


def test_a_metrics_file_that_differs_from_dvc_lock_is_a_one_line_error():
    files = {**FILES, "data/metrics/judged_cots/a.json": M_JUDGED + b" "}
    with pytest.raises(PipelineError, match=r"^data/metrics/judged_cots/a\.json: md5 \w+ differs from dvc\.lock") as e:
        build_card("judged_cots@a", LOCK, metrics=METS, files=files, code=CODE, packages={})
    assert "\n" not in str(e.value)
    with pytest.raises(PipelineError, match="not found"):
        build_card("raw_cots@a", LOCK, metrics=METS, files={}, code=CODE, packages={})


# ---------------------------------------------------------------------------- the card inside a checkpoint
NO_TIME = re.compile(r"\d{4}-\d{2}-\d{2}|\d{2}:\d{2}:\d{2}|wall|elapsed|hostname", re.IGNORECASE)


@pytest.fixture
def training_inputs(tmp_path, monkeypatch):
    """Real project inputs in a temp project: a base model directory, a JSONL dataset file, a dataset directory,
    the spec; cwd is the temp project, so paths are project-relative as in the pipeline."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data/base_model").mkdir(parents=True)
    (tmp_path / "data/base_model/config.json").write_text('{"model_type": "llama"}\n')
    (tmp_path / "data/base_model/model.safetensors").write_bytes(os.urandom(4096))
    (tmp_path / "data/sft_dataset").mkdir()
    shutil.copy(ROOT / "data/prompts/violence.jsonl", tmp_path / "data/sft_dataset/train.jsonl")
    shutil.copytree(ROOT / "data/prompts", tmp_path / "data/prompts")
    shutil.copytree(ROOT / "data/spec", tmp_path / "data/spec")
    return tmp_path


def _table_row(text: str, path: str) -> list:
    (line,) = [ln for ln in text.splitlines() if ln.startswith(f"| `{path}` |")]
    return [c.strip().strip("`") for c in line.strip("|").split("|")]


def test_checkpoint_card_pins_base_data_and_spec_by_md5_and_rewrites_identically(training_inputs):
    root = training_inputs
    summary = {"stage": "rl_checkpoint", "model": "data/base_model", "seed": 7,
               "datasets": ["data/sft_dataset/train.jsonl", "data/prompts"], "spec": "data/spec",
               "params": {"learning_rate": 1e-6, "num_generations": 4}, "metrics": {"train_time_s": 12.5}}
    ckpt = root / "data/.rl_checkpoint.staging"
    ckpt.mkdir()
    path = write_model_card(ckpt, summary)
    text = path.read_text()
    front, body = split_front_matter(text)
    assert front["base_model"] == "data/base_model" and front["library_name"] == "transformers"
    assert front["datasets"] == ["data/sft_dataset/train.jsonl", "data/prompts"]
    assert {"deliberative-alignment", "grpo"} <= set(front["tags"]) and front["pipeline_tag"] == "text-generation"
    # every training file with its own md5, size and rows; directories and the spec as DVC records them
    files = [root / "data/sft_dataset/train.jsonl", *sorted((root / "data/prompts").glob("*.jsonl"))]
    for f in files:
        rel = f.relative_to(root).as_posix()
        data = f.read_bytes()
        rows = sum(1 for ln in data.splitlines() if ln.strip())
        assert _table_row(body, rel)[1:] == [hashlib.md5(data).hexdigest(), str(len(data)), str(rows)]
    assert f"`data/prompts`: md5 `{dvc_md5(root / 'data/prompts')}`" in body
    assert f"`data/base_model`, md5 `{dvc_md5(root / 'data/base_model')}`" in body
    assert f"Spec hash: `{dvc_md5(root / 'data/spec')}`" in body
    assert "Seed: 7" in body and "learning_rate: 1.0e-06" in body
    assert "train_time_s" not in text and not NO_TIME.search(text)  # nothing that differs between two runs

    # a rewrite (the same inputs, files touched) gives the same bytes; a changed input a different card
    for f in files:
        os.utime(f, (1, 1))
    assert write_model_card(ckpt, summary).read_bytes() == text.encode()
    with (root / "data/prompts/violence.jsonl").open("a") as f:
        f.write('{"id": "new"}\n')
    assert write_model_card(ckpt, summary).read_text() != text


def test_card_inputs_come_from_the_training_summaries(training_inputs):
    sft = card_inputs({"stage": "sft_checkpoint", "base_model": "data/base_model", "seed": 0,
                       "dataset": "data/sft_dataset/train.jsonl", "params": {"lr": 1}, "loss_curve": [1, 2]})
    assert sft == {"stage": "sft_checkpoint", "base_model": "data/base_model", "seed": 0, "params": {"lr": 1},
                   "training_data": ["data/sft_dataset/train.jsonl"], "spec": []}
    with pytest.raises(PipelineError, match="no `stage`"):
        card_inputs({"params": {}})
    with pytest.raises(PipelineError, match=r"^data/sft_dataset/missing\.jsonl: not found"):
        model_card("sft_checkpoint", training_data=["data/sft_dataset/missing.jsonl"])


# ---------------------------------------------------------------------------- the model card with evaluation
EVAL = {"items": 30, "not_unsafe": 0.75, "not_unsafe_ci95": [0.5, 0.9], "not_unsafe_n": 12,
        "jailbreak_goodness_at_q": 0.4, "jailbreak_goodness_at_q_ci95": [0.21, 0.6], "jailbreak_goodness_at_q_n": 6,
        "refusal_agreement": 1.0, "per_category": {"a": {"not_unsafe": 1.0}}}


def test_eval_rows_are_the_metrics_with_an_interval():
    assert eval_rows(EVAL) == [{"metric": "not_unsafe", "value": 0.75, "ci95": [0.5, 0.9], "n": 12},
                               {"metric": "jailbreak_goodness_at_q", "value": 0.4, "ci95": [0.21, 0.6], "n": 6}]


def test_model_card_adds_evaluation_in_the_cards_output_and_never_touches_the_checkpoint(training_inputs):
    root = training_inputs
    ckpt = root / "data/sft_checkpoint"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(os.urandom(256))
    write_model_card(ckpt, {"stage": "sft_checkpoint", "base_model": "data/base_model", "seed": 0,
                            "dataset": "data/sft_dataset/train.jsonl", "params": {"lr": 1}})
    (ckpt / "training_summary.json").write_text(json.dumps({"metrics": {"final_loss": 1.25}}))
    eval_bytes = json.dumps(EVAL).encode()
    (root / "data/metrics/eval_scores").mkdir(parents=True)
    (root / "data/metrics/eval_scores/sft.json").write_bytes(eval_bytes)
    lock = json.loads(json.dumps(LOCK))
    lock["stages"]["sft_checkpoint"]["outs"][0]["md5"] = dvc_md5(ckpt)
    lock["stages"]["eval_scores@sft"]["outs"] = [_o("data/metrics/eval_scores/sft.json", eval_bytes)]
    lock["stages"]["eval_scores@sft"]["deps"][0]["md5"] = dvc_md5(ckpt)
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}

    full = write_model_card_dir("sft", "data/sft_checkpoint", lock, DVC_YAML, root / "data/cards/models/sft", CODE,
                                {"torch": "9.9"})
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before  # the checkpoint's own files, untouched
    text = (root / "data/cards/models/sft/README.md").read_text()
    front, body = split_front_matter(text)
    own_front, own_body = read_card(ckpt)
    assert {k: v for k, v in front.items() if k != "model-index"} == own_front  # the checkpoint's card, extended
    assert own_body.strip() in body
    (result,) = front["model-index"][0]["results"]
    metrics = {m["type"]: m for m in result["metrics"]}
    assert set(metrics) == {"not_unsafe", "jailbreak_goodness_at_q"}  # items / refusal_agreement have no interval
    assert metrics["not_unsafe"]["value"] == 0.75 and "95% CI [0.500, 0.900], n=12" in metrics["not_unsafe"]["name"]
    assert "| not_unsafe | 0.750 | [0.500, 0.900] | 12 |" in body
    assert f"Metrics file md5 `{hashlib.md5(eval_bytes).hexdigest()}`" in body
    assert f"Evaluated `data/sft_checkpoint`, md5 `{dvc_md5(ckpt)}` (dvc.lock)" in body
    assert "`final_loss`: 1.25" in body
    assert full["checkpoint"]["outs"][0]["md5"] == dvc_md5(ckpt)  # lineage: the checkpoint as dvc.lock records it
    assert json.loads((root / "data/cards/models/sft/card.json").read_text())["eval"]["values"] == EVAL

    # evaluation numbers that are not dvc.lock's are refused, and nothing is written
    (root / "data/metrics/eval_scores/sft.json").write_bytes(eval_bytes + b"\n")
    with pytest.raises(PipelineError, match=r"^data/metrics/eval_scores/sft\.json: md5 \w+ differs from dvc\.lock"):
        write_model_card_dir("sft", "data/sft_checkpoint", lock, DVC_YAML, root / "data/cards/models/sft", CODE, {})
    assert (root / "data/cards/models/sft/README.md").read_text() == text


def test_a_checkpoint_without_a_card_still_gets_one_from_dvc_lock():
    record = build_card("sft_checkpoint", LOCK, metrics=METS, files={}, code=CODE, packages={}, quote_metrics=False)
    text, _ = compose_model_card("sft", record, "eval_scores@sft", "e" * 32, EVAL, None)
    front, body = split_front_matter(text)
    assert front["model_name"] == "sft_checkpoint" and front["model-index"][0]["name"] == "sft_checkpoint"
    assert "no README.md of its own" in body and "`data/sft_checkpoint` | `cc.dir`" in body
    # a model directory no stage produces (eval_scores.models may name any path) is an input known by its md5
    text, full = compose_model_card("ext", None, "eval_scores@ext", "e" * 32, EVAL, None,
                                    evaluated={"path": "/models/ext", "md5": "ee.dir"})
    front, body = split_front_matter(text)
    assert front["model_name"] == "ext" and full["checkpoint"] is None
    assert "Evaluated `/models/ext`, md5 `ee.dir`" in body and "No stage of this pipeline produces" in body


# ---------------------------------------------------------------------------- tables
def test_read_table_counts_rows_and_types_columns_of_a_real_jsonl(tmp_path):
    src = ROOT / "data/prompts/violence.jsonl"
    rows = [json.loads(ln) for ln in src.read_text().splitlines() if ln.strip()]
    table = read_table(src)
    assert table.rows == len(rows) and table.bytes == src.stat().st_size
    assert [n for n, _ in table.columns] == list(dict.fromkeys(k for r in rows for k in r))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\n\n{"a": 2\n')
    with pytest.raises(PipelineError, match=r"bad\.jsonl:3: invalid JSON"):
        read_table(bad)
    (tmp_path / "empty.jsonl").write_text("\n")
    assert read_table(tmp_path / "empty.jsonl").rows == 0


# ---------------------------------------------------------------------------- dvc.yaml
@pytest.fixture(scope="module")
def manifest():
    from dagster_project.manifest import DvcManifest

    return DvcManifest.load(ROOT)


def test_card_stages_write_only_their_own_outs_and_read_only_what_they_describe(manifest):
    from dagster_project.manifest import dep_matches_out

    card_items = [i for i in manifest.items.values() if i.stage in ("cards", "model_cards")]
    assert {i.name for i in card_items} >= {"cards", "model_cards@base", "model_cards@sft", "model_cards@rl"}
    for item in card_items:
        for out in item.outs:
            assert out.path.startswith("data/cards/") and not out.cache
            others = [(o.path, i.name) for i in manifest.items.values() if i.name != item.name for o in i.outs]
            assert not [x for x in others if dep_matches_out(x[0], out.path)], (item.name, out.path)
    # the lineage picture: dataset cards hang off the datasets, model cards off one checkpoint and its evaluation
    ups = {s: {u for (u, d) in manifest.stage_edges() if d == s} for s in ("cards", "model_cards")}
    assert ups == {"cards": set(DATASET_STAGES),
                   "model_cards": {"base_model", "sft_checkpoint", "rl_checkpoint", "eval_scores"}}
    for key in ("base", "sft", "rl"):
        assert {manifest.items[u].stage for u in manifest.upstream_items(f"model_cards@{key}")} == {
            {"base": "base_model", "sft": "sft_checkpoint", "rl": "rl_checkpoint"}[key], "eval_scores"}
        assert f"eval_scores@{key}" in manifest.upstream_items(f"model_cards@{key}")


def test_artifacts_parse_with_dvc_and_point_at_model_outs(manifest):
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        declared = repo.artifacts.read()["dvc.yaml"]
    outs = {o.path: i.stage for i in manifest.items.values() for o in i.outs}
    assert {a.path for a in declared.values()} == {"data/base_model", "data/sft_checkpoint", "data/rl_checkpoint"}
    models = dict(yaml.safe_load((ROOT / "params.yaml").read_text())["eval_scores"]["models"])
    for name, art in declared.items():
        assert art.type == "model" and art.desc, name
        assert art.path in outs, f"artifact {name}: {art.path} is no stage's out"
        assert f"stage-{outs[art.path]}" in art.labels  # the label names the stage that writes it
        (key,) = [k for k, v in models.items() if v == art.path]  # and its evaluation / model card key
        assert f"eval-{key}" in art.labels


# ---------------------------------------------------------------------------- real tiny runs
def _stage(name: str, repo: Path) -> dict:
    """The project's dvc.yaml stage `name`, without the deps and params this tiny repo lacks."""
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][name]
    body = stage.get("do", stage)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    body = {**body, "deps": [d for d in body["deps"] if "$" in d or (repo / d).exists()],
            "params": [p for p in body.get("params", []) if p.split(".")[0] in params]}
    return {**stage, "do": body} if "do" in stage else body


def _add_stages(repo: Path, names) -> None:
    dvc_yaml = yaml.safe_load((repo / "dvc.yaml").read_text())
    for name in names:
        dvc_yaml["stages"][name] = _stage(name, repo)
    (repo / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))


def check_dataset_cards(repo: Path) -> dict:
    lock = read_lock(repo)["stages"]
    cards = {}
    for stage in DATASET_STAGES:
        card = json.loads((repo / f"data/cards/datasets/{stage}/card.json").read_text())
        front, body = split_front_matter((repo / f"data/cards/datasets/{stage}/README.md").read_text())
        cards[stage] = card
        keys = [k for k in lock if split_key(k)[0] == stage]
        assert set(card["items"]) == set(keys)
        for key in keys:
            rec = card["items"][key]
            assert {o["path"]: o["md5"] for o in rec["outs"]} | {p: m["md5"] for p, m in rec["metrics"].items()} \
                == {o["path"]: o["md5"] for o in lock[key]["outs"]}
            assert {d["path"]: d["md5"] for d in rec["deps"]} == {d["path"]: d["md5"] for d in lock[key]["deps"]}
            assert rec["params"] == lock[key].get("params", {})
            for cat, s in rec["spec"].items():
                assert s["md5"] == lock[f"spec_chunks@{cat}"]["outs"][0]["md5"] == dvc_md5(repo / s["path"])
        # every data file: rows and columns as the file has them, in the front matter and the table of files
        for info, cfg in zip(front["dataset_info"], front["configs"]):
            path = repo / cfg["data_files"][0]["path"]
            rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
            assert info["splits"][0]["num_examples"] == len(rows)
            assert [f["name"] for f in info["features"]] == list(dict.fromkeys(k for r in rows for k in r))
            data = path.read_bytes()
            assert (f"| {cfg['config_name']} | `{cfg['data_files'][0]['path']}` | {len(rows)} | {len(data)} | "
                    f"`{hashlib.md5(data).hexdigest()}` |") in body
    assert set(cards["raw_cots"]["items"]) == {f"raw_cots@{c}" for c in CATEGORIES}
    seeds = cards["judged_cots"]["items"][f"judged_cots@{CATEGORIES[0]}"]["seeds"]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert seeds["raw_cots.sampling.seed"] == params["raw_cots"]["sampling"]["seed"]  # an upstream stage's seed
    assert all(k.endswith("seed") for k in seeds)
    sft = cards["sft_dataset"]["items"]["sft_dataset"]
    assert set(sft["spec"]) == set(CATEGORIES)
    assert {u["stage"] for u in sft["upstream"]} >= {"base_model"} | {f"{s}@{c}" for s in ("raw_cots", "judged_cots")
                                                                     for c in CATEGORIES}
    assert sft["code"]["git_commit"] == sh("git rev-parse HEAD", repo).stdout.strip()
    return cards


@pytest.mark.slow
def test_dataset_cards_stage_of_a_tiny_run(tmp_path):
    repo = reproduced_spine(tmp_path / "repo")
    _add_stages(repo, ["cards"])
    first = sh("dvc repro", repo)
    assert ran_stages(first.stdout) == {"cards"}, first.stdout
    assert "up to date" in sh("dvc status", repo).stdout  # the stage does not make itself stale
    cards = check_dataset_cards(repo)
    assert cards["sft_dataset"]["items"]["sft_dataset"]["code"]["dirty_paths"] == ["dvc.yaml"]  # the stage added
    sh("git add -A && git commit -qm 'cards stage'", repo)

    # an experiment: the cards follow it, naming what `-S` changed (not dvc.lock or the metrics the run rewrote)
    run = sh("dvc exp run -S judged_cots.judge.threshold=5", repo)
    assert "cards" in ran_stages(run.stdout)
    cards = check_dataset_cards(repo)
    judged = cards["judged_cots"]["items"][f"judged_cots@{CATEGORIES[0]}"]
    assert judged["params"]["params.yaml"]["judged_cots.judge"]["threshold"] == 5
    assert judged["metrics"][f"data/metrics/judged_cots/{CATEGORIES[0]}.json"]["values"]["threshold"] == 5
    assert cards["sft_dataset"]["items"]["sft_dataset"]["code"]["dirty_paths"] == ["params.yaml"]

    # a workspace that differs from dvc.lock gets no card: one line, exit code 2, old cards untouched
    before = (repo / "data/cards/datasets/raw_cots/card.json").read_bytes()
    data = repo / f"data/raw_cots/{CATEGORIES[1]}.jsonl"
    data.chmod(0o644)
    data.write_text(data.read_text() + "\n")
    proc = sh("python -m pipelines cards", repo, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: data/raw_cots/{CATEGORIES[1]}.jsonl: md5 ")
    assert (repo / "data/cards/datasets/raw_cots/card.json").read_bytes() == before


@pytest.mark.slow
def test_model_card_stage_of_a_tiny_run(tmp_path):
    """base_model -> eval_scores@base -> model_cards@base with real `dvc repro` (tiny model, one item per set)."""
    params = {"eval_scores.models": {"base": "data/base_model"}, "report.models": ["base"],
              "eval_scores.sets": {**yaml.safe_load((ROOT / "params.yaml").read_text())["eval_scores"]["sets"],
                                   "harmful": 1, "benign": 1, "jailbreak": 1, "transforms": ["base64"],
                                   "transformations": 1, "multilingual": 1},
              "eval_scores.sampling.max_new_tokens": 8, "eval_scores.ratings": "proxy"}
    repo = reproduced_spine(tmp_path / "repo")  # base_model and refusal_classifier have run
    p = yaml.safe_load((repo / "params.yaml").read_text())
    for dotted, value in params.items():
        *head, last = dotted.split(".")
        node = p
        for k in head:
            node = node[k]
        node[last] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    _add_stages(repo, ["eval_scores", "model_cards"])  # ratings: proxy, so without the harm grader's dep
    sh("git add -A && git commit -qm 'evaluation and model cards'", repo)
    run = sh("dvc repro model_cards", repo, timeout=600)
    assert {"eval_scores@base", "model_cards@base"} <= ran_stages(run.stdout), run.stdout
    assert "up to date" in sh("dvc status", repo).stdout
    lock = read_lock(repo)["stages"]
    assert dvc_md5(repo / "data/base_model") == lock["base_model"]["outs"][0]["md5"]  # the checkpoint is as DVC left it

    front, body = split_front_matter((repo / "data/cards/models/base/README.md").read_text())
    values = json.loads((repo / "data/metrics/eval_scores/base.json").read_text())
    (result,) = front["model-index"][0]["results"]
    metrics = {m["type"]: m["value"] for m in result["metrics"]}
    assert metrics and metrics == {k: values[k] for k in metrics}
    assert set(metrics) == {k for k in values if f"{k}_ci95" in values and not isinstance(values[k], bool)
                            and isinstance(values[k], (int, float))}
    card = json.loads((repo / "data/cards/models/base/card.json").read_text())
    assert card["checkpoint"]["outs"] == [{k: o[k] for k in ("path", "md5", "size", "nfiles") if k in o}
                                          for o in lock["base_model"]["outs"]]
    (eval_out,) = [o for o in lock["eval_scores@base"]["outs"] if o["path"] == "data/metrics/eval_scores/base.json"]
    assert card["eval"]["md5"] == eval_out["md5"]
    assert card["evaluated"]["md5"] == lock["base_model"]["outs"][0]["md5"]  # evaluated = the checkpoint carded
    assert f"`data/base_model` | `{lock['base_model']['outs'][0]['md5']}`" in body
    # the base model has no card of its own: where its weights came from is quoted from its source.json
    assert card["source"] == json.loads((repo / "data/base_model/source.json").read_text()) and card["source"]
