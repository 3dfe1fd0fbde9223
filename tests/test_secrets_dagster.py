"""The API key of the HTTP backend lands in no file after a real `dvc repro` (dvc.lock included) and a Dagster
materialization with a persistent instance (its run storage, event logs and metadata included)."""
from __future__ import annotations

import dagster as dg
import pytest
import yaml

from dagster_project.build import build_definitions
from dagster_project.resource import DvcCliResource
from test_dagster_project import PER_CATEGORY, copy_repo, make_repo, sh
from tests.stub_openai_server import StubOpenAIServer

pytestmark = pytest.mark.slow
KEY_ENV = "DAF_SECRET_TEST_KEY"
KEY = "sk-live-NEVER-WRITE-ME-5d1e8a"


def leaks(*roots) -> list:
    return [str(f) for root in roots for f in root.rglob("*") if f.is_file() and KEY.encode() in f.read_bytes()]


def test_key_not_in_dvc_lock_nor_dagster_storage(tmp_path_factory, tmp_path, monkeypatch):
    repo = copy_repo(make_repo(tmp_path_factory.mktemp("fresh")), tmp_path / "repo")
    monkeypatch.setenv(KEY_ENV, KEY)
    home = tmp_path / "dagster_home"
    home.mkdir()
    with StubOpenAIServer(require_key=KEY, reply_fn=lambda body: f" {len(str(body)) % 11}\nRationale: ok") as server:
        backend = {"kind": "openai", "base_url": server.base_url, "model": "stub", "api_key_env": KEY_ENV,
                   "concurrency": 4, "max_retries": 2, "timeout_s": 5.0, "backoff_s": 0.01}
        p = yaml.safe_load((repo / "params.yaml").read_text())
        p["raw_cots"]["generator"] = backend
        p["judged_cots"]["judge"] = {"kind": "llm", "k": 2, "backend": backend}
        (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))

        sh("dvc repro -q spec_chunks@erotic raw_cots@erotic judged_cots@erotic", repo, env={KEY_ENV: KEY})
        defs = build_definitions(repo)
        with dg.DagsterInstance.from_config(str(home)) as instance:
            result = dg.materialize(list(defs.assets), selection=["base_model", *PER_CATEGORY],
                                    partition_key="violence", instance=instance,
                                    resources={"dvc": DvcCliResource(project_dir=str(repo))})
        assert result.success
        assert server.chat_requests and all(r.headers.get("authorization") == f"Bearer {KEY}"
                                            for r in server.chat_requests)
    lock = (repo / "dvc.lock").read_text()
    assert "judged_cots@violence" in lock and "judged_cots@erotic" in lock and KEY_ENV in lock
    assert any(home.rglob("*.db")), "the Dagster instance keeps its run/event storage on disk (sqlite)"
    assert leaks(repo, home) == []
    planted = repo / "data" / "planted.txt"  # the scan itself can fail
    planted.write_text(f"oops {KEY}")
    assert leaks(repo, home) == [str(planted)]
