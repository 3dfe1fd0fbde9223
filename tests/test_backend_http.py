"""OpenAIChatBackend against a real local HTTP server (tests/stub_openai_server.py): ordering, seeds, retries,
timeouts, fatal errors, the concurrency bound, API-key handling and prefill. Delays are kept to tenths of a second."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from pipelines.backends.openai_http import OpenAIChatBackend
from pipelines.errors import PipelineError
from pipelines.params.common import OpenAIBackend, Sampling
from tests.stub_openai_server import StubOpenAIServer

KEY_ENV = "DAF_TEST_OPENAI_KEY"
FAKE_KEY = "sk-test-9f8e7d6c5b4a-do-not-leak"


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    """httpx honours proxy variables; a developer's proxy must not intercept requests to 127.0.0.1."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


def make_backend(url: str, **overrides) -> OpenAIChatBackend:
    fields = dict(kind="openai", base_url=url, model="stub-model", concurrency=4, max_retries=3, timeout_s=5.0,
                  backoff_s=0.01)
    fields.update(overrides)
    return OpenAIChatBackend(OpenAIBackend(**fields))


def convs(*texts: str):
    return [[{"role": "system", "content": "be brief"}, {"role": "user", "content": t}] for t in texts]


SAMPLING = Sampling(temperature=0.7, top_p=0.9, max_new_tokens=64, seed=11)


# ---------------------------------------------------------------------------- happy path
def test_samples_keep_order_and_follow_seeds():
    texts = ["alpha question", "beta question", "gamma question"]
    with StubOpenAIServer(latency_s=0.01) as server:
        with make_backend(server.base_url) as backend:
            out = backend.generate(convs(*texts), n=3, sampling=SAMPLING, progress=False)
            again = backend.generate(convs(*texts), n=3, sampling=SAMPLING, progress=False)
            shifted = backend.generate(convs(*texts), n=1, sampling=SAMPLING.model_copy(update={"seed": 12}),
                                       progress=False)
            stats = dict(backend.stats)
        bodies = [r.body for r in server.chat_requests]

    assert [len(row) for row in out] == [3, 3, 3]
    for i, text in enumerate(texts):
        for j in range(3):
            # the stub's reply names the user message and the seed it was asked with
            assert text in out[i][j] and f"seed={11 + j}" in out[i][j]
        assert len(set(out[i])) == 3  # different sample index -> different seed -> different content
        assert shifted[i][0] == out[i][1]  # seed 12 is sample 1 of seed 11: per-sample seeds, not per call
    assert again == out

    assert len(bodies) == 9 + 9 + 3
    first = bodies[0]
    assert set(first) == {"model", "messages", "temperature", "top_p", "max_tokens", "seed", "n"}
    assert (first["model"], first["temperature"], first["top_p"], first["max_tokens"], first["n"]) == (
        "stub-model", 0.7, 0.9, 64, 1)
    assert sorted(b["seed"] for b in bodies[:9]) == [11, 11, 11, 12, 12, 12, 13, 13, 13]
    assert stats["requests"] == 21 and stats["succeeded"] == 21 and stats["retries"] == 0 and stats["errors"] == {}


def test_results_do_not_depend_on_concurrency():
    texts = [f"question {k}" for k in range(6)]
    with StubOpenAIServer(latency_s=0.005) as server:
        with make_backend(server.base_url, concurrency=1) as serial, make_backend(server.base_url,
                                                                                  concurrency=5) as parallel:
            a = serial.generate(convs(*texts), n=2, sampling=SAMPLING, progress=False)
            b = parallel.generate(convs(*texts), n=2, sampling=SAMPLING, progress=True)  # bar on: must not break
    assert a == b


def test_name_names_model_and_url():
    with make_backend("http://127.0.0.1:9/v1/") as backend:  # constructing sends nothing
        assert backend.name == "openai:stub-model@http://127.0.0.1:9/v1"


def test_empty_input_sends_nothing():
    with StubOpenAIServer() as server:
        with make_backend(server.base_url) as backend:
            assert backend.generate([], n=4, sampling=SAMPLING, progress=False) == []
        assert server.requests == []


# ---------------------------------------------------------------------------- retries
def test_transient_faults_are_retried_until_success():
    with StubOpenAIServer() as clean:
        with make_backend(clean.base_url) as backend:
            expected = backend.generate(convs("hello"), n=1, sampling=SAMPLING, progress=False)

    faults = ["429", "500", "truncated_json", "bad_utf8"]
    with StubOpenAIServer(faults=faults) as server:
        with make_backend(server.base_url, max_retries=5) as backend:
            out = backend.generate(convs("hello"), n=1, sampling=SAMPLING, progress=False)
            stats = backend.stats
        seen = server.chat_requests

    assert out == expected
    assert [r.fault for r in seen] == faults + ["ok"]
    assert all(r.body == seen[0].body for r in seen)  # a retry repeats the identical request (same seed)
    assert stats["retries"] == 4 and stats["requests"] == 5 and stats["succeeded"] == 1
    assert stats["errors"] == {"http_429": 1, "http_500": 1, "invalid_json": 1, "invalid_utf8": 1}


def test_dropped_connection_and_empty_choices_are_retried():
    with StubOpenAIServer(faults=["disconnect", "no_content", "503"]) as server:
        with make_backend(server.base_url, max_retries=3) as backend:
            out = backend.generate(convs("hi"), n=1, sampling=SAMPLING, progress=False)
            assert backend.stats["errors"] == {"connection": 1, "no_content": 1, "http_503": 1}
    assert "hi" in out[0][0]


def test_backoff_doubles_between_retries():
    with StubOpenAIServer(faults=["500", "500", "500"]) as server:
        with make_backend(server.base_url, backoff_s=0.05, max_retries=3) as backend:
            backend.generate(convs("x"), n=1, sampling=SAMPLING, progress=False)
        seen = server.chat_requests
    gaps = [b.started - a.ended for a, b in zip(seen, seen[1:])]
    assert len(gaps) == 3
    for gap, delay in zip(gaps, [0.05, 0.1, 0.2]):
        assert delay * 0.9 <= gap < delay + 0.5


def test_retry_after_on_429_is_honoured():
    with StubOpenAIServer(faults=["429"], retry_after=0.3) as server:
        with make_backend(server.base_url, backoff_s=0.0) as backend:
            backend.generate(convs("x"), n=1, sampling=SAMPLING, progress=False)
        first, second = server.chat_requests
    assert second.started - first.ended >= 0.27


def test_timeout_then_success():
    with StubOpenAIServer(faults=["timeout"], hang_s=5.0) as server:
        with make_backend(server.base_url, timeout_s=0.3) as backend:
            start = time.monotonic()
            out = backend.generate(convs("slow one"), n=1, sampling=SAMPLING, progress=False)
            elapsed = time.monotonic() - start
            assert backend.stats["errors"] == {"timeout": 1} and backend.stats["retries"] == 1
        stop_started = time.monotonic()
    assert time.monotonic() - stop_started < 2.0  # the stub drops its hanging request at shutdown
    assert "slow one" in out[0][0]
    assert 0.3 <= elapsed < 2.0


def test_stub_shuts_down_cleanly_with_requests_still_open():
    threads_before = set(threading.enumerate())
    server = StubOpenAIServer(faults=["timeout"], hang_s=30.0).start()
    with make_backend(server.base_url, timeout_s=0.2, max_retries=0) as backend:
        with pytest.raises(PipelineError, match="timeout"):  # leaves a request hanging on the server
            backend.generate(convs("a"), n=1, sampling=SAMPLING, progress=False)
        idle = make_backend(server.base_url)
        idle.generate(convs("b"), n=1, sampling=SAMPLING, progress=False)  # leaves an idle keep-alive connection
        start = time.monotonic()
        server.stop()
        assert time.monotonic() - start < 2.0
    idle.close()
    assert set(threading.enumerate()) <= threads_before  # serving and handler threads are all gone
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()


def test_server_that_stays_down_fails_with_one_clear_error():
    with StubOpenAIServer(after="500") as server:
        backend = make_backend(server.base_url, max_retries=2)
        with pytest.raises(PipelineError) as info:
            backend.generate(convs("a"), n=1, sampling=SAMPLING, progress=False)
        backend.close()
        assert len(server.chat_requests) == 3  # 1 try + 2 retries
    msg = str(info.value)
    assert "\n" not in msg
    assert f"{server.base_url}/chat/completions" in msg
    assert "3 attempts" in msg and "HTTP 500" in msg
    assert backend.stats["failed_calls"] == 1 and backend.stats["errors"] == {"http_500": 3}


def test_failure_of_one_request_stops_the_others():
    # the first request is rejected for good; the others meet a 503 and would back off 1 s, 2 s, 4 s if not stopped
    with StubOpenAIServer(faults=["400"], after="503") as server:
        with make_backend(server.base_url, concurrency=2, max_retries=3, backoff_s=1.0) as backend:
            start = time.monotonic()
            with pytest.raises(PipelineError, match="HTTP 400"):
                backend.generate(convs(*[f"q{k}" for k in range(6)]), n=2, sampling=SAMPLING, progress=False)
            elapsed = time.monotonic() - start
        assert len(server.chat_requests) <= 3  # queued requests were never sent
    assert elapsed < 0.9


def test_unreachable_server_fails_after_retries():
    with StubOpenAIServer() as server:
        url = server.base_url  # the port is free again once the server is stopped
    with make_backend(url, max_retries=1) as backend:
        with pytest.raises(PipelineError, match="2 attempts.*connection error"):
            backend.generate(convs("a"), n=1, sampling=SAMPLING, progress=False)


@pytest.mark.parametrize("fault", ["401", "400", "404"])
def test_client_errors_fail_at_once(fault):
    with StubOpenAIServer(faults=[fault]) as server:
        with make_backend(server.base_url, max_retries=5) as backend:
            with pytest.raises(PipelineError, match=f"HTTP {fault}.*not retried"):
                backend.generate(convs("a"), n=1, sampling=SAMPLING, progress=False)
            assert backend.stats["retries"] == 0
        assert len(server.chat_requests) == 1


# ---------------------------------------------------------------------------- concurrency
def test_concurrency_is_bounded():
    with StubOpenAIServer(latency_s=0.15) as server:
        with make_backend(server.base_url, concurrency=3) as backend:
            out = backend.generate(convs(*[f"q{k}" for k in range(4)]), n=2, sampling=SAMPLING, progress=False)
        peak = server.max_concurrent
    assert sum(len(row) for row in out) == 8
    assert 1 < peak <= 3


def test_seeded_random_faults_are_survived_and_reproducible():
    kinds = ("429", "500", "disconnect", "truncated_json", "bad_utf8", "no_content")
    texts = [f"prompt {k}" for k in range(8)]
    with StubOpenAIServer() as clean:
        with make_backend(clean.base_url) as backend:
            expected = backend.generate(convs(*texts), n=2, sampling=SAMPLING, progress=False)
    runs = []
    for _ in range(2):
        with StubOpenAIServer(fault_rate=0.4, fault_kinds=kinds, fault_seed=3) as server:
            with make_backend(server.base_url, concurrency=4, max_retries=8, backoff_s=0.0) as backend:
                out = backend.generate(convs(*texts), n=2, sampling=SAMPLING, progress=False)
                retries = backend.stats["retries"]
            runs.append((out, server.fault_counts(), retries))
    assert runs[0][0] == expected and runs[1][0] == expected
    assert runs[0][1] == runs[1][1]  # same faults despite concurrent (unordered) arrival
    assert runs[0][2] == runs[1][2] == sum(v for k, v in runs[0][1].items() if k != "ok") > 0


# ---------------------------------------------------------------------------- API key
def test_api_key_comes_from_the_named_env_var(monkeypatch):
    monkeypatch.setenv(KEY_ENV, FAKE_KEY)
    with StubOpenAIServer(require_key=FAKE_KEY) as server:
        with make_backend(server.base_url, api_key_env=KEY_ENV) as backend:
            backend.generate(convs("a"), n=1, sampling=SAMPLING, progress=False)
            assert FAKE_KEY not in repr(backend) and FAKE_KEY not in backend.name
        with make_backend(server.base_url) as keyless:  # no api_key_env -> no Authorization header
            with pytest.raises(PipelineError, match="HTTP 401") as info:
                keyless.generate(convs("a"), n=1, sampling=SAMPLING, progress=False)
        with_key, without_key = server.chat_requests
    assert with_key.headers["authorization"] == f"Bearer {FAKE_KEY}"
    assert "authorization" not in without_key.headers
    assert FAKE_KEY not in str(info.value)


@pytest.mark.parametrize("value", [None, "", "   "])
def test_missing_key_names_the_variable(monkeypatch, value):
    if value is None:
        monkeypatch.delenv(KEY_ENV, raising=False)
    else:
        monkeypatch.setenv(KEY_ENV, value)
    with pytest.raises(PipelineError, match=KEY_ENV):
        make_backend("http://127.0.0.1:9/v1", api_key_env=KEY_ENV)


def test_key_never_appears_in_errors_even_if_the_server_echoes_it(monkeypatch):
    monkeypatch.setenv(KEY_ENV, FAKE_KEY)
    echo = lambda request, status: f"rejected credentials {request.headers.get('authorization')}"  # noqa: E731
    for faults, retries in ((["401"], 3), ([], 1)):
        with StubOpenAIServer(faults=faults, after="502", error_message_fn=echo) as server:
            with make_backend(server.base_url, api_key_env=KEY_ENV, max_retries=retries) as backend:
                with pytest.raises(PipelineError) as info:
                    backend.generate(convs("a"), n=1, sampling=SAMPLING, progress=False)
            assert FAKE_KEY in server.chat_requests[0].headers["authorization"]  # it really was sent...
        text = str(info.value)
        assert "rejected credentials Bearer ***" in text  # ...the server echoed it, and we scrubbed it
        assert FAKE_KEY not in text and FAKE_KEY not in repr(info.value) and FAKE_KEY not in str(backend.stats)


# ---------------------------------------------------------------------------- prefill
@pytest.mark.parametrize("echo_prefill", [False, True])
def test_prefill_is_sent_for_continuation_and_not_repeated(echo_prefill):
    prefill = "<think>\nThe user asks"
    conversations = convs("tell me a joke", "and another")
    before = [list(map(dict, c)) for c in conversations]
    with StubOpenAIServer(echo_prefill=echo_prefill) as server:
        with make_backend(server.base_url) as backend:
            out = backend.generate(conversations, n=2, sampling=SAMPLING, prefill=prefill, progress=False)
            plain = backend.generate(conversations, n=2, sampling=SAMPLING, progress=False)
        sent = [r.body for r in server.chat_requests if r.body["seed"] == SAMPLING.seed][:2]

    assert conversations == before  # the caller's messages were not modified
    assert sorted((b["messages"][:-1] for b in sent), key=repr) == sorted(conversations, key=repr)
    for body in sent:
        assert body["messages"][-1] == {"role": "assistant", "content": prefill}
        assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    for row in out:
        for text in row:
            assert not text.startswith("<think>")
    assert out == plain  # the stub's continuation is what it would have said anyway, minus any echo


def test_repetition_penalty_is_sent_only_when_set():
    with StubOpenAIServer() as server:
        with make_backend(server.base_url) as backend:
            backend.generate(convs("a"), n=1, sampling=SAMPLING, progress=False)
            backend.generate(convs("b"), n=1, sampling=SAMPLING.model_copy(update={"repetition_penalty": 1.1}),
                             progress=False)
        bodies = {r.body["messages"][-1]["content"]: r.body for r in server.chat_requests}
    assert "repetition_penalty" not in bodies["a"]  # default 1.0: a plain OpenAI request
    assert bodies["b"]["repetition_penalty"] == 1.1
