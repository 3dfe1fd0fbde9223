"""Class 8 of issue 21: secrets reflected by a server were persisted; a key pasted as the variable name was printed.

Promise: the API key (read from the variable api_key_env names) appears in no text the HTTP backend returns and in
no file our writers produce, whatever the server echoes (the Authorization header, the bare key, the key repeated,
JSON-escaped); a value of api_key_env that is not a variable name (a pasted key) is refused without being shown.
"""
from __future__ import annotations

import http.server
import json
import random
import string
import threading
from pathlib import Path

import pytest
import yaml

import pipelines.io as pio
from pipelines.backends.openai_http import OpenAIChatBackend, _read_api_key
from pipelines.errors import PipelineError
from pipelines.io import write_json, write_jsonl, write_text
from pipelines.params import parse_params
from pipelines.params.common import OpenAIBackend, Sampling
from test_hostile_common import make_project, minimal_params, refused, run_cli

KEY_ENV = "DAF_HOSTILE_KEY"
KEY_CHARS = string.ascii_letters + string.digits + "-_.~+/="


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(pio, "_SECRETS", set(), raising=False)  # keys registered here must not scrub other tests' files


def random_key(rng: random.Random) -> str:
    return "sk-" + "".join(rng.choice(KEY_CHARS) for _ in range(rng.randint(16, 60)))


def echo(auth: str, rng: random.Random) -> str:
    """What a hostile server puts in its reply: the header or the bare key, once or more, raw or JSON-escaped."""
    key = auth.removeprefix("Bearer ")
    pieces = [rng.choice([auth, key, json.dumps(key), f"Authorization: {auth}", f"{key}{key}"])
              for _ in range(rng.randint(1, 3))]
    return rng.choice(["", "your key is ", "echo:\u2028"]) + " ".join(pieces) + rng.choice(["", ".", " thanks"])


class EchoServer:
    """An OpenAI-compatible endpoint that answers 200 with the request's Authorization header in the content."""

    def __init__(self, seed: int = 0) -> None:
        rng = random.Random(seed)
        lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers.get("content-length", 0)))
                with lock:
                    content = echo(self.headers.get("authorization", ""), rng)
                body = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}],
                                   "model": content}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


N_KEYS = 40


def test_backend_never_returns_the_key_whatever_the_server_echoes(monkeypatch):
    rng = random.Random(0)
    server = EchoServer(seed=1)
    try:
        for case in range(N_KEYS):
            key = random_key(rng)
            monkeypatch.setenv(KEY_ENV, key)
            cfg = OpenAIBackend(kind="openai", base_url=server.base_url, model="m", api_key_env=KEY_ENV,
                                max_retries=0, timeout_s=10.0, concurrency=4)
            with OpenAIChatBackend(cfg) as backend:
                out = backend.generate([[{"role": "user", "content": f"q{i}"}] for i in range(3)], n=2,
                                       sampling=Sampling(), progress=False)
            texts = [t for row in out for t in row]
            assert all("***" in t for t in texts)  # the server did echo it
            for t in texts:
                assert key not in t and json.dumps(key)[1:-1] not in t, t
    finally:
        server.close()


N_WRITES = 120


def test_writers_scrub_a_registered_secret_from_every_file(tmp_path):
    rng = random.Random(2)
    keys = [random_key(rng) for _ in range(5)]
    for k in keys:
        pio.register_secret(k)
    for case in range(N_WRITES):
        key = rng.choice(keys)
        form = rng.choice([key, f"Bearer {key}", json.dumps(key)[1:-1]])
        value = "x" * rng.randint(0, 5) + form + rng.choice(["", "\n", "\u2028", " tail"])
        kind = case % 3
        path = tmp_path / f"out-{case}"
        if kind == 0:
            write_jsonl(path, [{"reply": value, "nested": {"k": [value]}}])
        elif kind == 1:
            write_json(path, {"model": value})
        else:
            write_text(path, value)
        data = path.read_bytes().decode("utf-8")
        for k in keys:
            assert k not in data and json.dumps(k)[1:-1] not in data, data


def test_stage_over_an_echoing_server_persists_the_key_nowhere(tmp_path, monkeypatch):
    rng = random.Random(3)
    server = EchoServer(seed=4)
    try:
        for case in range(3):
            key = random_key(rng)
            gen = {"kind": "openai", "base_url": server.base_url, "model": "m", "api_key_env": KEY_ENV,
                   "max_retries": 0, "timeout_s": 10.0}
            params = minimal_params()
            params["raw_cots"]["generator"] = gen
            project = make_project(tmp_path / f"p{case}", params)
            monkeypatch.setenv(KEY_ENV, key)
            assert run_cli("spec_chunks", "--category", "violence", project=project).code == 0
            r = run_cli("raw_cots", "--category", "violence", project=project)
            assert r.code == 0, r
            assert "***" in (project / "data/raw_cots/violence.jsonl").read_text()  # the server did echo it
            for f in Path(project).rglob("*"):
                if f.is_file():
                    data = f.read_bytes()
                    assert key.encode() not in data and json.dumps(key)[1:-1].encode() not in data, f
    finally:
        server.close()


N_PASTED = 60


def test_key_pasted_as_the_variable_name_is_refused_without_being_shown(tmp_path):
    rng = random.Random(5)
    project = make_project(tmp_path / "p")
    for case in range(N_PASTED):
        key = rng.choice([random_key(rng), "".join(rng.choice(string.ascii_letters + string.digits)
                                                    for _ in range(rng.randint(20, 50)))])
        p = minimal_params(paths={"spec": str(project / "data/spec"), "prompts": str(project / "data/prompts")})
        p["raw_cots"]["generator"] = {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m",
                                      "api_key_env": key}
        with pytest.raises(PipelineError) as e:
            parse_params(p)
        assert "raw_cots.generator.api_key_env" in str(e.value) and key not in str(e.value), str(e.value)
        with pytest.raises(PipelineError) as e:
            _read_api_key(key)  # the backend's own check, for callers that build configs without validation
        assert key not in str(e.value) and "api_key_env" in str(e.value)
    key = random_key(rng)
    p = minimal_params()
    p["raw_cots"]["generator"] = {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m", "api_key_env": key}
    (project / "params.yaml").write_text(yaml.safe_dump(p))
    line = refused(run_cli("raw_cots", "--category", "violence", project=project), "api_key_env")
    assert key not in line
