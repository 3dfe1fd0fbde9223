"""Flaky OpenAI-compatible endpoint and secrets: generation and LLM judging survive a seeded fault schedule with the
same results as a clean server; a server that stays down fails the stage with one line and keeps finished shards;
the API key never lands in any file."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from conftest import fake_params, run_cli
from tests.stub_openai_server import StubOpenAIServer

KEY_ENV = "DAF_TEST_API_KEY"
KEY = "sk-test-DO-NOT-LEAK-7f3a91c2"


def openai_params(base_url: str, **extra) -> dict:
    p = fake_params(categories=["violence"])
    p["raw_cots"]["generator"] = {"kind": "openai", "base_url": base_url, "model": "stub", "api_key_env": KEY_ENV,
                                  "concurrency": 4, "max_retries": 6, "timeout_s": 1.0, "backoff_s": 0.01, **extra}
    return p


def judge_reply(body: dict) -> str:
    """A judge that answers in the expected form (the score follows the prefill 'Score:')."""
    return f" {len(json.dumps(body)) % 11}\nRationale: stub grade"


def run_gen_and_judge(workdir: Path, server: StubOpenAIServer, llm_judge: bool = True) -> list:
    p = openai_params(server.base_url)
    if llm_judge:
        p["judged_cots"]["judge"] = {"kind": "llm", "k": 2, "backend": dict(p["raw_cots"]["generator"])}
    (workdir / "params.yaml").write_text(yaml.safe_dump(p))
    env = {KEY_ENV: KEY}
    run_cli("spec_chunks", "--category", "violence", cwd=workdir, check=True, env=env)
    run_cli("raw_cots", "--category", "violence", cwd=workdir, check=True, env=env)
    run_cli("judged_cots", "--category", "violence", cwd=workdir, check=True, env=env)
    return [json.loads(line) for line in (workdir / "data/judged_cots/violence.jsonl").read_text().splitlines()]


def strip_run_specific(rows):
    return [{k: v for k, v in r.items() if k not in ("generator", "judge", "generator_params")} for r in rows]


def test_flaky_endpoint_gives_same_results_as_clean_one(tmp_path, workdir):
    import shutil

    clean_dir = tmp_path / "clean"
    shutil.copytree(workdir, clean_dir)
    with StubOpenAIServer(require_key=KEY, reply_fn=None) as clean:
        expected = run_gen_and_judge(clean_dir, clean, llm_judge=False)
    kinds = ("429", "500", "503", "timeout", "disconnect", "truncated_json", "bad_utf8", "no_content")
    with StubOpenAIServer(require_key=KEY, fault_rate=0.3, fault_kinds=kinds, fault_seed=3, hang_s=2.0) as flaky:
        got = run_gen_and_judge(workdir, flaky, llm_judge=False)
        faults = flaky.fault_counts()
    assert sum(v for k, v in faults.items() if k != "ok") >= 5, faults
    assert strip_run_specific(got) == strip_run_specific(expected)
    assert len({r["id"] for r in got}) == len(got) == 8


def test_llm_judge_over_flaky_endpoint(workdir):
    with StubOpenAIServer(require_key=KEY, fault_rate=0.25, fault_kinds=("429", "500", "truncated_json", "bad_utf8"),
                          fault_seed=5, reply_fn=judge_reply) as flaky:
        rows = run_gen_and_judge(workdir, flaky, llm_judge=True)
    judged = [r for r in rows if r["parse_ok"]]
    assert judged and all(len(r["scores"]) == 2 and r["score"] == min(r["scores"]) for r in judged)
    assert all(r["judge"].startswith("llm:openai:") for r in rows)


def test_server_that_stays_down_fails_cleanly_and_keeps_shards(workdir):
    # 2 prompts per shard x 2 samples x 2 phases = 8 requests per shard: let two shards through, then go down.
    with StubOpenAIServer(require_key=KEY, faults=["ok"] * 16, after="500") as server:
        p = openai_params(server.base_url, max_retries=2)
        p["raw_cots"]["max_prompts"] = 6  # three shards: two succeed, the third meets the dead server
        (workdir / "params.yaml").write_text(yaml.safe_dump(p))
        env = {KEY_ENV: KEY}
        run_cli("spec_chunks", "--category", "violence", cwd=workdir, check=True, env=env)
        proc = run_cli("raw_cots", "--category", "violence", cwd=workdir, env=env)
    assert proc.returncode == 2
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "gave up after 3 attempts" in errors[0] and "HTTP 500" in errors[0], proc.stderr[-800:]
    shards = sorted((workdir / "data/.work/raw_cots/violence").glob("shard-*.jsonl"))
    assert len(shards) == 2  # finished work is kept for the rerun
    assert not (workdir / "data/raw_cots/violence.jsonl").exists()
    assert KEY not in proc.stderr + proc.stdout


def test_api_key_is_in_no_file(workdir):
    with StubOpenAIServer(require_key=KEY, reply_fn=judge_reply) as server:
        run_gen_and_judge(workdir, server, llm_judge=True)
        assert all(r.headers.get("authorization") == f"Bearer {KEY}" for r in server.chat_requests)
    leaks = [str(f) for f in workdir.rglob("*") if f.is_file() and KEY.encode() in f.read_bytes()]
    assert leaks == []
    assert KEY_ENV in (workdir / "params.yaml").read_text()  # params name the variable, never its value


def test_missing_key_variable_is_one_clear_error(workdir):
    with StubOpenAIServer(require_key=KEY) as server:
        (workdir / "params.yaml").write_text(yaml.safe_dump(openai_params(server.base_url)))
        run_cli("spec_chunks", "--category", "violence", cwd=workdir, check=True)
        proc = run_cli("raw_cots", "--category", "violence", cwd=workdir)
    assert proc.returncode == 2 and KEY_ENV in proc.stderr
