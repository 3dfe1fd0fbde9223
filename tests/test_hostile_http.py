"""Class 7 of issue 21: timeouts bounded each socket read, not the request.

Promise: with `timeout_s: T`, one HTTP attempt of the OpenAI backend ends within T (plus scheduling slack) whatever
the server does: trickle the whole reply (status line and headers included) or only the body at any rate, stall
after the headers, or never answer. A reply that completes in time is returned; one that does not is a one-line
timeout error. Before: a server sending one byte every 0.3 s held a request with T = 1 s for 31 s.

The server here is a raw socket server (no HTTP library), so it can trickle any byte of the reply. It bounds its own
time: it stops sending after CAP_S and closes, so this file ends within seconds even on code without the deadline.
"""
from __future__ import annotations

import json
import random
import socket
import threading
import time
from typing import Dict, List

import pytest

from pipelines.backends.openai_http import OpenAIChatBackend
from pipelines.errors import PipelineError
from pipelines.params.common import OpenAIBackend, Sampling

CAP_S = 8.0  # the server never spends longer than this on one connection
SLACK_S = 0.6  # thread scheduling on a loaded 2-core machine, connection set-up


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


def reply_bytes(content: str) -> tuple:
    body = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}).encode()
    head = (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode()
    return head, body


class TrickleServer:
    """Answers POST /c<case>/v1/chat/completions according to plans[case]:
    kind "trickle_all" (every byte, `interval` apart), "trickle_body" (headers at once), "stall_after_headers",
    "stall" (accept, read, send nothing), "fast" (all at once)."""

    def __init__(self) -> None:
        self.plans: Dict[str, dict] = {}
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def url(self, case: str) -> str:
        return f"http://127.0.0.1:{self.port}/{case}/v1"

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        start = time.monotonic()
        try:
            conn.settimeout(2.0)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, rest = data.partition(b"\r\n\r\n")
            length = int(next((ln.split(b":")[1] for ln in head.split(b"\r\n")
                               if ln.lower().startswith(b"content-length")), b"0"))
            while len(rest) < length:
                rest += conn.recv(65536)
            case = head.split(b" ")[1].decode().split("/")[1]
            plan = self.plans[case]
            rh, rb = reply_bytes(plan["content"])
            kind, interval = plan["kind"], plan.get("interval", 0.0)

            def trickle(buf: bytes) -> bool:
                for i in range(len(buf)):
                    if self.stop.is_set() or time.monotonic() - start > CAP_S:
                        return False
                    conn.sendall(buf[i:i + 1])
                    time.sleep(interval)
                return True

            def stall() -> None:
                while not self.stop.is_set() and time.monotonic() - start < CAP_S:
                    time.sleep(0.02)

            if kind == "fast":
                conn.sendall(rh + rb)
            elif kind == "trickle_all":
                trickle(rh + rb)
            elif kind == "trickle_body":
                conn.sendall(rh)
                trickle(rb)
            elif kind == "stall_after_headers":
                conn.sendall(rh + rb[: len(rb) // 3])
                stall()
            elif kind == "stall":
                stall()
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        self.thread.join(timeout=2)


def make_backend(url: str, timeout_s: float, max_retries: int = 0, backoff_s: float = 0.05) -> OpenAIChatBackend:
    cfg = OpenAIBackend(kind="openai", base_url=url, model="m", timeout_s=timeout_s, max_retries=max_retries,
                        backoff_s=backoff_s, concurrency=1)
    return OpenAIChatBackend(cfg)


def attempt(backend: OpenAIChatBackend) -> dict:
    """One generate() call, timed alone (building the client, which loads CA certificates, is not part of it)."""
    t0 = time.monotonic()
    try:
        out = backend.generate([[{"role": "user", "content": "hi"}]], n=1, sampling=Sampling(), progress=False)
        result = {"ok": out[0][0]}
    except PipelineError as e:
        result = {"error": str(e)}
    result["elapsed"] = time.monotonic() - t0
    return result


N_CASES = 48


def attempt_all(server, backends) -> List[dict]:
    """One attempt per backend, all at once (each in its own thread); then the server and backends are closed."""
    results: List[dict] = [{} for _ in backends]
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, attempt(backends[i])))
               for i in range(len(backends))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=CAP_S + 10)
    finally:
        server.close()
        for b in backends:
            b.close()
    return results


def test_one_attempt_ends_within_its_deadline_whatever_the_server_trickles():
    rng = random.Random(0)
    server = TrickleServer()
    plans: List[dict] = []
    for i in range(N_CASES):
        kind = rng.choice(["trickle_all", "trickle_all", "trickle_body", "trickle_body", "stall_after_headers",
                           "stall", "fast"])
        plan = {"kind": kind, "interval": rng.choice([0.002, 0.01, 0.03, 0.1, 0.3]) * rng.uniform(0.8, 1.2),
                "content": f"reply-{i}", "timeout_s": round(rng.uniform(0.3, 0.8), 2)}
        head, body = reply_bytes(plan["content"])
        sent = {"trickle_all": len(head) + len(body), "trickle_body": len(body)}.get(kind, 0)
        plan["needs_s"] = {"stall": float("inf"), "stall_after_headers": float("inf"),
                           "fast": 0.0}.get(kind, sent * plan["interval"])
        server.plans[f"c{i}"] = plan
        plans.append(plan)
    backends = [make_backend(server.url(f"c{i}"), plans[i]["timeout_s"]) for i in range(N_CASES)]
    results = attempt_all(server, backends)
    kinds_timed_out = set()
    for plan, res in zip(plans, results):
        assert res, "attempt did not return"
        bound = plan["timeout_s"] + SLACK_S
        assert res["elapsed"] <= bound, (plan, res)  # the promise: one deadline per attempt
        if plan["needs_s"] <= 0.25 * plan["timeout_s"]:
            assert res.get("ok") == plan["content"], (plan, res)
        elif plan["needs_s"] >= 2 * plan["timeout_s"]:
            assert "timeout" in res.get("error", ""), (plan, res)
            kinds_timed_out.add(plan["kind"])
        if "error" in res:
            assert "\n" not in res["error"]
    assert {"trickle_all", "trickle_body", "stall_after_headers", "stall"} <= kinds_timed_out


def test_retries_each_get_their_own_deadline_and_the_whole_call_is_bounded():
    server = TrickleServer()
    kinds = ["stall", "trickle_all", "trickle_body", "stall_after_headers"]
    for i, kind in enumerate(kinds):
        server.plans[f"r{i}"] = {"kind": kind, "interval": 0.2, "content": "late"}
    backends = [make_backend(server.url(f"r{i}"), timeout_s=0.4, max_retries=2, backoff_s=0.05)
                for i in range(len(kinds))]
    results = attempt_all(server, backends)
    for res in results:
        assert "gave up after 3 attempts" in res.get("error", ""), res
        assert res["elapsed"] <= 3 * 0.4 + 0.05 + 0.1 + SLACK_S, res
