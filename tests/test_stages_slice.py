"""A spec_chunks -> raw_cots -> judged_cots -> sft_dataset slice through the real CLI, fake generator, temp dir;
plus kill -9 during raw_cots and resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import yaml

from conftest import ROOT, fake_params, run_cli
from pipelines.io import read_jsonl
from pipelines.params import parse_params
from pipelines.spec import load_spec
from pipelines.sft_dataset import assert_spec_free, build_examples, spec_lines

CATS = ["violence", "self_harm"]


def run_slice(cwd, categories=CATS):
    for c in categories:
        run_cli("spec_chunks", "--category", c, cwd=cwd, check=True)
        run_cli("raw_cots", "--category", c, cwd=cwd, check=True)
        run_cli("judged_cots", "--category", c, cwd=cwd, check=True)


def test_slice_records_provenance_and_flags(workdir):
    p = fake_params(categories=CATS)
    (workdir / "params.yaml").write_text(yaml.safe_dump(p))
    run_slice(workdir)
    raw = read_jsonl(workdir / "data/raw_cots/violence.jsonl")
    n = p["raw_cots"]["n_samples"]
    assert len(raw) == p["raw_cots"]["max_prompts"] * n
    r = raw[0]
    for key in ("prompt_id", "category", "expected", "policy", "sample_index", "generator", "generator_params",
                "spec_chunk_sha256", "cot", "answer", "parse_ok"):
        assert key in r
    assert {x["sample_index"] for x in raw} == set(range(n))
    judged = read_jsonl(workdir / "data/judged_cots/violence.jsonl")
    assert [j["id"] for j in judged] == [x["id"] for x in raw]
    for j in judged:
        assert j["score"] == min(j["scores"]) and j["kept"] == (j["score"] >= p["judged_cots"]["judge"]["threshold"])
        assert j["judge_sees_cot"] is True
        if not j["parse_ok"]:
            assert j["score"] == 0 and "unparsed" in j["rationale"]
    m = json.loads((workdir / "data/metrics/judged_cots/violence.json").read_text())
    assert m["samples"] == len(judged) and m["kept"] == sum(j["kept"] for j in judged)


def test_sft_dataset_is_spec_free_and_deterministic(workdir):
    p = fake_params(categories=CATS)
    p["raw_cots"]["n_samples"] = 4
    (workdir / "params.yaml").write_text(yaml.safe_dump(p))
    run_slice(workdir)
    run_cli("sft_dataset", cwd=workdir, check=True)
    first = (workdir / "data/sft_dataset/train.jsonl").read_text()
    run_cli("sft_dataset", cwd=workdir, check=True)
    assert (workdir / "data/sft_dataset/train.jsonl").read_text() == first
    rows = read_jsonl(workdir / "data/sft_dataset/train.jsonl")
    assert rows, "the fake generator yields some samples that pass the rubric"
    chunks = [(workdir / f"data/spec_chunks/{c}.md").read_text() for c in CATS]
    for row in rows:
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["system", "user", "assistant"]
        prompt_side = row["messages"][0]["content"] + row["messages"][1]["content"]
        assert not any(ln in prompt_side for ln in spec_lines(chunks))
        assert row["messages"][2]["content"].startswith("<think>\n") and "</think>" in row["messages"][2]["content"]
    per_prompt = {}
    for row in rows:
        per_prompt[row["prompt_id"]] = per_prompt.get(row["prompt_id"], 0) + 1
    assert max(per_prompt.values()) <= p["sft_dataset"]["max_per_prompt"]
    m = json.loads((workdir / "data/metrics/sft_dataset.json").read_text())
    assert m["examples"] == len(rows) and set(m["per_category"]) == set(CATS)


def test_leaked_spec_text_is_caught():
    spec = load_spec(ROOT / "data/spec", ["violence"])
    chunk = spec.chunk("violence")
    judged = {"violence": [{"id": "v#0", "prompt_id": "v", "kept": True, "score": 9, "sample_index": 0,
                            "expected": "refuse", "policy": "V.2", "prompt": "hi", "cot": "V.2", "answer": "No."}]}
    leaky = build_examples(judged, "You follow this spec:\n" + chunk, 1)
    try:
        assert_spec_free(leaky, spec_lines([chunk]))
    except Exception as e:
        assert "leaked" in str(e)
    else:
        raise AssertionError("spec text in the system prompt was not detected")
    assert_spec_free(build_examples(judged, "You are helpful.", 1), spec_lines([chunk]))


def _start(cwd, category):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "pipelines", "raw_cots", "--category", category], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_kill_during_raw_cots_then_resume(tmp_path, workdir):
    p = fake_params(categories=["violence"])
    p["raw_cots"].update(max_prompts=12, shard_size=1, generator={"kind": "fake", "delay_s": 0.15})
    (workdir / "params.yaml").write_text(yaml.safe_dump(p))
    run_cli("spec_chunks", "--category", "violence", cwd=workdir, check=True)
    # reference: an uninterrupted run in a second copy
    ref = tmp_path / "ref"
    ref.mkdir()
    for sub in ("data", "params.yaml"):
        src = workdir / sub
        (ref / sub).parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-r", str(src), str(ref / sub)], check=True)
    run_cli("raw_cots", "--category", "violence", cwd=ref, check=True)
    expected = read_jsonl(ref / "data/raw_cots/violence.jsonl")

    shards = workdir / "data/.work/raw_cots/violence"
    kills = 0
    for _ in range(3):  # kill -9 three times at different points, then let it finish
        proc = _start(workdir, "violence")
        target = len(list(shards.glob("shard-*.jsonl"))) + 2 if shards.exists() else 2
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            if shards.exists() and len(list(shards.glob("shard-*.jsonl"))) >= target:
                break
            time.sleep(0.02)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        assert not (workdir / "data/raw_cots/violence.jsonl").exists()  # never a half-written out
    assert kills >= 2
    done_before = len(list(shards.glob("shard-*.jsonl")))
    assert 0 < done_before < 12
    run_cli("raw_cots", "--category", "violence", cwd=workdir, check=True)
    got = read_jsonl(workdir / "data/raw_cots/violence.jsonl")
    ids = [r["id"] for r in got]
    assert len(ids) == len(set(ids)) == 24
    assert got == expected  # same records, same order, same content as the uninterrupted run


def test_changed_params_discard_stale_shards(workdir):
    p = fake_params(categories=["violence"])
    (workdir / "params.yaml").write_text(yaml.safe_dump(p))
    run_cli("spec_chunks", "--category", "violence", cwd=workdir, check=True)
    run_cli("raw_cots", "--category", "violence", cwd=workdir, check=True)
    p["raw_cots"]["sampling"]["seed"] = 7
    (workdir / "params.yaml").write_text(yaml.safe_dump(p))
    run_cli("raw_cots", "--category", "violence", cwd=workdir, check=True)
    rows = read_jsonl(workdir / "data/raw_cots/violence.jsonl")
    assert all(r["generator_params"]["seed"] >= 7 for r in rows)
    parse_params(p)
