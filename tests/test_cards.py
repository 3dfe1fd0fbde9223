"""Artifact cards: lineage logic on a small dvc.lock, then cards of a real tiny run that name dvc.lock's exact md5s,
a `cards` DVC stage that keeps `dvc status` clean, and a loud failure when the workspace differs from dvc.lock."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from dvc_repo import CATEGORIES, ran_stages, read_lock, reproduced_spine, sh
from pipelines.cards import (CARD_STAGES, build_card, build_cards, metrics_paths, producers, source_state, split_key,
                             upstream)
from pipelines.errors import PipelineError

# What docs/versioning.md proposes for dvc.yaml; the project's own `cards` stage replaces it once merged.
CARDS_STAGE = {
    "cmd": "python -m pipelines cards",
    "deps": ["pipelines", "configs", "data/spec", "data/prompts", "data/evals", "data/spec_chunks", "data/base_model",
             "data/raw_cots", "data/judged_cots", "data/sft_dataset", "data/sft_checkpoint", "data/rl_checkpoint",
             "data/metrics/raw_cots", "data/metrics/judged_cots", "data/metrics/sft_dataset.json",
             "data/metrics/sft_checkpoint.json", "data/metrics/rl_checkpoint.json", "data/metrics/eval_scores"],
    "params": ["categories", "paths", "base_model", "raw_cots", "judged_cots.judge", "sft_dataset", "sft_checkpoint",
               "rl_checkpoint", "eval_scores"],
    "outs": [{"data/cards": {"cache": False}}],
}


# ---------------------------------------------------------------------------- pure lineage logic
def _o(path, text):
    return {"path": path, "hash": "md5", "md5": hashlib.md5(text).hexdigest(), "size": len(text)}


SPEC = b"# spec of a\n"
M_RAW, M_JUDGED, M_EVAL_SFT, M_EVAL_BASE = b'{"n": 4}', b'{"keep_rate": 0.5}', b'{"refusal": 0.9}', b'{"refusal": 0.1}'
LOCK = {"schema": "2.0", "stages": {
    "base_model": {"cmd": "b", "deps": [_o("pipelines/base_model.py", b"x")],
                   "params": {"params.yaml": {"base_model": {"local_path": None}}},
                   "outs": [{**_o("data/base_model", b"m"), "md5": "aa.dir", "nfiles": 3}]},
    "spec_chunks@a": {"cmd": "s", "deps": [_o("data/spec/categories/a.md", b"a")],
                      "outs": [_o("data/spec_chunks/a.md", SPEC)]},
    "raw_cots@a": {"cmd": "r", "deps": [_o("data/base_model", b"m") | {"md5": "aa.dir"}, _o("data/spec_chunks/a.md", SPEC)],
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
    # the SFT evaluation also reads the base model (say, for its tokenizer): the SFT card must still get only sft's
    "eval_scores@sft": {"cmd": "e", "deps": [{**_o("data/sft_checkpoint", b"C"), "md5": "cc.dir"},
                                             {**_o("data/base_model", b"m"), "md5": "aa.dir"}],
                        "outs": [_o("data/metrics/eval_scores/sft.json", M_EVAL_SFT)]},
    "eval_scores@base": {"cmd": "e", "deps": [{**_o("data/base_model", b"m"), "md5": "aa.dir"}],
                         "outs": [_o("data/metrics/eval_scores/base.json", M_EVAL_BASE)]},
}}
DVC_YAML = {"stages": {
    "raw_cots": {"foreach": "${categories}", "do": {"metrics": [{"data/metrics/raw_cots/${item}.json": {"cache": False}}]}},
    "judged_cots": {"foreach": ["a"], "do": {"metrics": ["data/metrics/judged_cots/${item}.json"]}},
    "eval_scores": {"foreach": ["base", "sft"], "do": {"metrics": ["data/metrics/eval_scores/${item}.json"]}},
}}
FILES = {"data/spec_chunks/a.md": SPEC, "data/metrics/raw_cots/a.json": M_RAW,
         "data/metrics/judged_cots/a.json": M_JUDGED, "data/metrics/eval_scores/sft.json": M_EVAL_SFT,
         "data/metrics/eval_scores/base.json": M_EVAL_BASE}
CODE = {"git_commit": "0" * 40, "dirty": False, "dirty_paths": []}


def test_lineage_is_followed_through_directory_deps_upstream_first():
    prod = producers(LOCK["stages"])
    assert prod["sft_dataset"]["data/judged_cots"] == ["judged_cots@a"]  # a dir dep on a file out
    ups = upstream("sft_checkpoint", prod)
    assert set(ups) == {"base_model", "spec_chunks@a", "raw_cots@a", "judged_cots@a", "sft_dataset"}
    for k in ups:  # each stage comes after everything it depends on
        assert all(ups.index(u) < ups.index(k) for u in upstream(k, prod))


def test_card_of_a_checkpoint_names_lock_md5s_seeds_spec_and_its_own_eval():
    cards = build_cards(LOCK, DVC_YAML, FILES, CODE, {"torch": "9.9"})
    assert set(cards) == {k for k in LOCK["stages"] if split_key(k)[0] in CARD_STAGES}
    c = cards["sft_checkpoint"]
    assert c["kind"] == "checkpoint" and c["outs"] == [{"path": "data/sft_checkpoint", "md5": "cc.dir", "size": 1}]
    assert c["seeds"] == {"raw_cots.sampling.seed": 3, "sft_checkpoint.seed": 11, "sft_checkpoint.data_seed": 12}
    assert c["spec"] == {"a": {"path": "data/spec_chunks/a.md", "md5": hashlib.md5(SPEC).hexdigest(),
                               "sha256": hashlib.sha256(SPEC).hexdigest()}}
    assert list(c["eval"]) == ["eval_scores@sft"]
    assert c["eval"]["eval_scores@sft"]["data/metrics/eval_scores/sft.json"]["values"] == json.loads(M_EVAL_SFT)
    assert list(cards["base_model"]["eval"]) == ["eval_scores@base"]
    assert {u["stage"]: u["outs"][0]["md5"] for u in c["upstream"]}["sft_dataset"] == "dd.dir"
    # metrics outs (per dvc.yaml, ${item} filled in) are quoted with their values, not listed as artifacts
    j = cards["judged_cots@a"]
    assert [o["path"] for o in j["outs"]] == ["data/judged_cots/a.jsonl"]
    assert j["metrics"]["data/metrics/judged_cots/a.json"]["values"] == {"keep_rate": 0.5}
    assert j["kind"] == "dataset" and j["eval"] == {}
    assert metrics_paths(DVC_YAML, ["raw_cots@a"])["raw_cots@a"] == {"data/metrics/raw_cots/a.json"}


def test_dirty_means_changed_sources_not_what_the_run_itself_rewrote():
    code = {"git_commit": "1" * 40, "dirty": True,
            "dirty_paths": ["dvc.lock", "data/metrics/judged_cots/a.json", "data/base_model/config.json",
                            "params.yaml", "pipelines/judges.py"]}
    assert source_state(code, LOCK)["dirty_paths"] == ["params.yaml", "pipelines/judges.py"]
    only_outputs = {**code, "dirty_paths": ["dvc.lock", "data/metrics/raw_cots/a.json"]}
    assert source_state(only_outputs, LOCK)["dirty"] is False
    assert source_state({"git_commit": None, "dirty": None, "dirty_paths": []}, LOCK)["dirty"] is None


def test_a_spec_chunk_that_differs_from_dvc_lock_is_a_one_line_error():
    files = {**FILES, "data/spec_chunks/a.md": SPEC + b"edited\n"}
    with pytest.raises(PipelineError, match=r"^data/spec_chunks/a\.md: md5 \w+ differs from dvc\.lock") as e:
        build_card("judged_cots@a", LOCK, metrics=metrics_paths(DVC_YAML, LOCK["stages"]), files=files, code=CODE,
                   packages={})
    assert "\n" not in str(e.value)
    with pytest.raises(PipelineError, match="not found"):
        build_card("raw_cots@a", LOCK, metrics=metrics_paths(DVC_YAML, LOCK["stages"]),
                   files={k: v for k, v in FILES.items() if "raw_cots" not in k}, code=CODE, packages={})


# ---------------------------------------------------------------------------- a real tiny run
# Until pipelines/cli.py has the `cards` subcommand (the lead's file), register the same thing on the fly.
CARDS_CMD = ("python -c \"from pathlib import Path; from pipelines.cli import app, _run; "
             "app.command('cards')(lambda: _run('cards', Path('params.yaml'))); app()\" cards")
if "\"cards\"" in (ROOT / "pipelines/cli.py").read_text():
    CARDS_CMD = "python -m pipelines cards"


def cards_stage(repo: Path) -> dict:
    """The project's `cards` stage if dvc.yaml has one, else the proposed one; deps/params this repo lacks dropped."""
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].get("cards") or CARDS_STAGE
    params = yaml.safe_load((repo / "params.yaml").read_text())
    stage = {**stage, "deps": [d for d in stage["deps"] if (repo / d).exists()],
             "params": [p for p in stage.get("params", []) if p.split(".")[0] in params]}
    stage["cmd"] = CARDS_CMD
    return stage


def check_cards_against_lock(repo: Path) -> dict:
    lock = read_lock(repo)["stages"]
    carded = {k for k in lock if split_key(k)[0] in CARD_STAGES}
    assert carded >= {"base_model", "sft_dataset"} | {f"judged_cots@{c}" for c in CATEGORIES}
    cards = {}
    for key in carded:
        card = json.loads((repo / f"data/cards/{key}.json").read_text())
        md = (repo / f"data/cards/{key}.md").read_text()
        cards[key] = card
        lock_outs = {o["path"]: o["md5"] for o in lock[key]["outs"]}
        named = {o["path"]: o["md5"] for o in card["outs"]} | {p: m["md5"] for p, m in card["metrics"].items()}
        assert named == lock_outs, key
        assert all(md5 in md for md5 in lock_outs.values()), key
        assert {d["path"]: d["md5"] for d in card["deps"]} == {d["path"]: d["md5"] for d in lock[key]["deps"]}
        assert card["params"] == lock[key].get("params", {})
        for u in card["upstream"]:
            assert {o["path"]: o["md5"] for o in u["outs"]} == {o["path"]: o["md5"] for o in lock[u["stage"]]["outs"]}
        for cat, s in card["spec"].items():
            data = (repo / s["path"]).read_bytes()
            assert s["md5"] == lock[f"spec_chunks@{cat}"]["outs"][0]["md5"] == hashlib.md5(data).hexdigest()
            assert s["sha256"] == hashlib.sha256(data).hexdigest()
    # the merged dataset descends from every category's spec, judged data and generations
    sft = cards["sft_dataset"]
    assert set(sft["spec"]) == set(CATEGORIES)
    assert {u["stage"] for u in sft["upstream"]} >= {"base_model"} | {f"{s}@{c}" for s in ("raw_cots", "judged_cots")
                                                                     for c in CATEGORIES}
    assert cards[f"judged_cots@{CATEGORIES[0]}"]["seeds"] == {"raw_cots.sampling.seed": 0}
    assert sft["code"]["git_commit"] == sh("git rev-parse HEAD", repo).stdout.strip()
    return cards


@pytest.mark.slow
def test_cards_of_a_tiny_run_name_the_exact_md5s_of_dvc_lock(tmp_path):
    repo = reproduced_spine(tmp_path / "repo")
    sh(CARDS_CMD, repo)
    cards = check_cards_against_lock(repo)
    assert cards["sft_dataset"]["code"]["dirty"] is False

    # A workspace that differs from dvc.lock cannot get a card: one line, exit code 2, old cards untouched.
    before = (repo / "data/cards/sft_dataset.json").read_bytes()
    path = repo / f"data/spec_chunks/{CATEGORIES[1]}.md"
    path.chmod(0o644)
    path.write_text(path.read_text() + "edited\n")
    proc = sh(CARDS_CMD, repo, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: data/spec_chunks/{CATEGORIES[1]}.md: md5 ")
    assert (repo / "data/cards/sft_dataset.json").read_bytes() == before


@pytest.mark.slow
def test_cards_stage_keeps_status_clean_and_follows_an_experiment(tmp_path):
    repo = reproduced_spine(tmp_path / "repo")
    dvc_yaml = yaml.safe_load((repo / "dvc.yaml").read_text())
    dvc_yaml["stages"]["cards"] = cards_stage(repo)
    (repo / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    first = sh("dvc repro", repo)
    assert ran_stages(first.stdout) == {"cards"}, first.stdout
    assert "up to date" in sh("dvc status", repo).stdout  # the stage does not make itself stale
    assert ran_stages(sh("dvc repro", repo).stdout) == set()
    sh("git add -A && git commit -qm 'cards stage'", repo)

    run = sh("dvc exp run -S judged_cots.judge.threshold=5", repo)
    assert "cards" in ran_stages(run.stdout)
    cards = check_cards_against_lock(repo)
    assert cards["sft_dataset"]["code"]["dirty_paths"] == ["params.yaml"]  # what `-S` changed, not dvc.lock/metrics
    judged = cards[f"judged_cots@{CATEGORIES[0]}"]
    assert judged["params"]["params.yaml"]["judged_cots.judge"]["threshold"] == 5
    assert judged["metrics"][f"data/metrics/judged_cots/{CATEGORIES[0]}.json"]["values"]["threshold"] == 5
