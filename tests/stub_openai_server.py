"""A small but real OpenAI-compatible chat-completions server for tests and benchmarks.

It listens on 127.0.0.1 (a free port), answers `POST /v1/chat/completions` and `GET /v1/models`, and can be told to
misbehave. Nothing is mocked: clients talk to it over real sockets, so timeouts, dropped connections, truncated and
mis-encoded bodies look to them exactly as they would from a flaky vLLM or hosted endpoint.

    from tests.stub_openai_server import StubOpenAIServer

    with StubOpenAIServer(faults=["429", "500", "ok"], latency_s=0.05) as server:
        server.base_url                 # "http://127.0.0.1:PORT/v1" (str(server) gives the same)
        ...                             # point a client at it
        server.requests                 # one RecordedRequest per request seen, in arrival order
        server.max_concurrent           # most requests it was handling at the same moment

Replies are deterministic: the content is derived from (last user message, seed) by `default_reply`, so a test can
check which conversation and which seed a completion came from. Pass `reply_fn(body) -> str` to script other content
(for example a judge's "Score: 8").

Faults. Each chat request gets one *fault kind*, chosen in this order:
1. `faults`: a scripted list consumed one entry per chat request, in arrival order;
2. once the list is used up: with `fault_rate > 0`, a seeded random draw from `fault_kinds`; the draw depends only on
   (fault_seed, model, last user message, seed, how many times that same request was seen before), not on arrival
   order, so a concurrent client sees the same faults on every run;
3. otherwise `after` (default "ok"; "500" makes a server that stays down).

Fault kinds:
    "ok"              200 with a normal completion
    "<status>"        that HTTP status with an OpenAI-style error body, e.g. "429", "500", "503", "401", "400";
                      a 429 carries `Retry-After: <retry_after>` when `retry_after` is set
    "timeout"         accept the request, send nothing for `hang_s` seconds (or until shutdown), then drop it
    "disconnect"      close the connection without any response
    "truncated_json"  200 whose JSON body is cut in half (Content-Length matches the cut body)
    "bad_utf8"        200 whose body is JSON with bytes that are not valid UTF-8 inside the content string
    "no_content"      200 with valid JSON but an empty `choices` list
"""
from __future__ import annotations

import hashlib
import http.server
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

FAULT_KINDS = ("ok", "timeout", "disconnect", "truncated_json", "bad_utf8", "no_content")  # plus any "<status>"
DEFAULT_RANDOM_FAULTS = ("429", "500", "503", "timeout", "disconnect", "truncated_json", "bad_utf8", "no_content")


def last_user_message(messages: Sequence[Dict[str, Any]]) -> str:
    """Content of the last `user` message ("" if there is none)."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return str(message.get("content", ""))
    return ""


def default_reply(body: Dict[str, Any]) -> str:
    """Deterministic reply text for a request body: names its seed and the last user message."""
    user = last_user_message(body.get("messages", []))
    seed = body.get("seed")
    tag = hashlib.sha256(f"{seed}\x00{user}".encode()).hexdigest()[:8]
    return f"[{tag}] seed={seed} reply to: {user}"


@dataclass
class RecordedRequest:
    """One request as the server saw it. `headers` keys are lower-case; `body` is None when it was not JSON."""

    index: int  # arrival order, 0-based, over all requests
    method: str
    path: str
    headers: Dict[str, str]
    body: Optional[Dict[str, Any]]
    fault: str  # the fault kind it was answered with ("ok" for a normal reply)
    started: float  # time.monotonic() when it arrived
    ended: Optional[float] = None  # time.monotonic() when its handling finished


@dataclass
class _State:
    """Mutable server state shared by handler threads; every access goes through `lock`."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: List[RecordedRequest] = field(default_factory=list)
    script_pos: int = 0
    seen: Dict[str, int] = field(default_factory=dict)  # request key -> times seen (for the random schedule)
    in_flight: int = 0
    max_concurrent: int = 0


class StubOpenAIServer:
    """OpenAI-compatible chat-completions server on 127.0.0.1, run in a daemon thread.

    Args:
        faults: scripted fault kinds, one per chat request in arrival order (see the module docstring).
        after: fault kind once `faults` is used up and no random schedule applies ("ok", or e.g. "500").
        fault_rate: probability (0..1) that a request past the script gets a random fault from `fault_kinds`.
        fault_kinds: kinds the random schedule draws from, uniformly.
        fault_seed: seed of the random schedule.
        latency_s: seconds every chat request waits before it is answered (faults included).
        hang_s: seconds a "timeout" fault holds the request before dropping it (cut short by shutdown).
        retry_after: value of the Retry-After header on 429 answers (seconds); None sends no header.
        reply_fn: body -> reply content; default `default_reply`.
        echo_prefill: when the request ends with an assistant message and asks to continue it, start the returned
            content with that message (as a server that ignores `continue_final_message` might); by default the
            content is only the continuation, as vLLM returns it.
        require_key: when set, chat requests without `Authorization: Bearer <require_key>` get a 401.
        error_message_fn: (request, status) -> message text of error answers; lets a test play a server that
            echoes parts of the request (headers, say) back in its errors.
        model_name: id listed by GET /v1/models.
    """

    def __init__(
        self,
        *,
        faults: Optional[Sequence[str]] = None,
        after: str = "ok",
        fault_rate: float = 0.0,
        fault_kinds: Sequence[str] = DEFAULT_RANDOM_FAULTS,
        fault_seed: int = 0,
        latency_s: float = 0.0,
        hang_s: float = 10.0,
        retry_after: Optional[float] = None,
        reply_fn: Optional[Callable[[Dict[str, Any]], str]] = None,
        echo_prefill: bool = False,
        require_key: Optional[str] = None,
        error_message_fn: Optional[Callable[[RecordedRequest, int], str]] = None,
        model_name: str = "stub-model",
    ) -> None:
        for kind in [*(faults or []), after, *fault_kinds]:
            _check_kind(kind)
        if not 0.0 <= fault_rate <= 1.0:
            raise ValueError(f"fault_rate must be in [0, 1], got {fault_rate}")
        self.faults = list(faults or [])
        self.after = after
        self.fault_rate = fault_rate
        self.fault_kinds = tuple(fault_kinds)
        self.fault_seed = fault_seed
        self.latency_s = latency_s
        self.hang_s = hang_s
        self.retry_after = retry_after
        self.reply_fn = reply_fn or default_reply
        self.echo_prefill = echo_prefill
        self.require_key = require_key
        self.error_message_fn = error_message_fn
        self.model_name = model_name

        self._state = _State()
        self._stopping = threading.Event()  # wakes sleeping handlers (latency, "timeout") at shutdown
        self._httpd: Optional[_Httpd] = None
        self._thread: Optional[threading.Thread] = None
        self._port: Optional[int] = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "StubOpenAIServer":
        if self._httpd is not None:
            raise RuntimeError("stub server already started")
        self._stopping.clear()
        self._httpd = _Httpd(("127.0.0.1", 0), _make_handler(self))
        self._port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="stub-openai", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, wake and drop every open connection, and wait for all handler threads."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()  # stops serve_forever
        httpd.close_open_connections()  # idle keep-alive connections would otherwise hold their threads
        httpd.server_close()  # joins handler threads
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> "StubOpenAIServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ what clients and tests read
    @property
    def port(self) -> int:
        """The port it listens (or, once stopped, last listened) on."""
        if self._port is None:
            raise RuntimeError("stub server was never started")
        return self._port

    @property
    def base_url(self) -> str:
        """Base URL an OpenAI client expects, e.g. http://127.0.0.1:PORT/v1 (still readable after stop())."""
        return f"http://127.0.0.1:{self.port}/v1"

    def __str__(self) -> str:
        return self.base_url

    @property
    def requests(self) -> List[RecordedRequest]:
        """A copy of every recorded request, in arrival order."""
        with self._state.lock:
            return list(self._state.requests)

    @property
    def chat_requests(self) -> List[RecordedRequest]:
        return [r for r in self.requests if r.path.endswith("/chat/completions")]

    @property
    def max_concurrent(self) -> int:
        with self._state.lock:
            return self._state.max_concurrent

    def fault_counts(self) -> Dict[str, int]:
        """How many chat requests were answered with each fault kind."""
        counts: Dict[str, int] = {}
        for r in self.chat_requests:
            counts[r.fault] = counts.get(r.fault, 0) + 1
        return counts

    def reset(self, faults: Optional[Sequence[str]] = None) -> None:
        """Forget recorded requests and counters; optionally load a new fault script."""
        with self._state.lock:
            for kind in faults or []:
                _check_kind(kind)
            self._state.requests.clear()
            self._state.seen.clear()
            self._state.script_pos = 0
            self._state.max_concurrent = self._state.in_flight
            if faults is not None:
                self.faults = list(faults)

    # ------------------------------------------------------------------ internals used by the handler
    def _pick_fault(self, body: Optional[Dict[str, Any]]) -> str:
        """Fault kind of the next chat request (called with the state lock held)."""
        st = self._state
        if st.script_pos < len(self.faults):
            st.script_pos += 1
            return self.faults[st.script_pos - 1]
        if self.fault_rate > 0 and self.fault_kinds:
            body = body or {}
            key = json.dumps(
                [body.get("model"), last_user_message(body.get("messages", [])), body.get("seed")], sort_keys=True
            )
            times_seen = st.seen.get(key, 0)
            st.seen[key] = times_seen + 1
            digest = hashlib.sha256(f"{self.fault_seed}\x00{key}\x00{times_seen}".encode()).digest()
            draw = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
            if draw < self.fault_rate:
                pick = int.from_bytes(digest[8:16], "big") % len(self.fault_kinds)
                return self.fault_kinds[pick]
        return self.after

    def _completion(self, body: Dict[str, Any]) -> Dict[str, Any]:
        """A chat.completion object answering `body`; the reply is cut to `max_tokens` words."""
        messages = body.get("messages", [])
        words = self.reply_fn(body).split(" ")
        max_tokens = body.get("max_tokens")
        finish = "stop"
        if isinstance(max_tokens, int) and 0 < max_tokens < len(words):
            words, finish = words[:max_tokens], "length"
        content = " ".join(words)
        continuing = bool(messages) and messages[-1].get("role") == "assistant" and body.get("continue_final_message")
        if continuing and self.echo_prefill:
            content = str(messages[-1].get("content", "")) + content
        prompt_words = sum(len(str(m.get("content", "")).split()) for m in messages)
        return {
            "id": "chatcmpl-" + hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16],
            "object": "chat.completion",
            "created": 0,
            "model": body.get("model", self.model_name),
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}
            ],
            "usage": {
                "prompt_tokens": prompt_words,
                "completion_tokens": len(words),
                "total_tokens": prompt_words + len(words),
            },
        }


def _check_kind(kind: str) -> None:
    if kind in FAULT_KINDS or (len(kind) == 3 and kind.isdigit() and 100 <= int(kind) <= 599):
        return
    raise ValueError(f"unknown fault kind {kind!r}: use one of {FAULT_KINDS} or a 3-digit HTTP status like '503'")


class _Httpd(http.server.ThreadingHTTPServer):
    """Threading server that remembers open connections so shutdown can drop idle keep-alive ones."""

    daemon_threads = False  # server_close() joins handler threads: a clean, complete shutdown
    block_on_close = True
    # socketserver's default listen backlog is 5: 32 clients connecting at once had SYNs dropped and retried after
    # ~1 s, which read as the backend not scaling past 8 (bench_http c=32: x3.3 with 5, see bench/README.md)
    request_queue_size = 128

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._conns: set = set()
        self._conns_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def close_open_connections(self) -> None:
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # the handler's next read sees EOF and its thread ends
            except OSError:
                pass


def _make_handler(server: StubOpenAIServer) -> type:
    state = server._state

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real inference servers do
        timeout = 30  # an idle connection is dropped after this many seconds (a safety net)
        # Headers and body go out in two writes; with Nagle on, the second waits for a delayed ACK (~40 ms on
        # loopback), which would dwarf the latency a test or benchmark configures.
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet test output
            pass

        # -------------------------------------------------------------- sending
        def _send(self, status: int, payload: bytes, headers: Optional[Dict[str, str]] = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)
            self.wfile.flush()

        def _send_error_json(self, status: int, message: str, headers: Optional[Dict[str, str]] = None) -> None:
            kind = "rate_limit_error" if status == 429 else "server_error" if status >= 500 else "invalid_request_error"
            body = {"error": {"message": message, "type": kind, "code": status}}
            self._send(status, json.dumps(body).encode(), headers)

        # -------------------------------------------------------------- routes
        def do_GET(self) -> None:
            self._record_simple("GET")
            if self.path.rstrip("/") in ("/v1/models", "/models"):
                data = {"object": "list", "data": [{"id": server.model_name, "object": "model", "owned_by": "stub"}]}
                self._send(200, json.dumps(data).encode())
            else:
                self._send_error_json(404, f"no route {self.path}")

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw.decode("utf-8")) if raw else None
            except (UnicodeDecodeError, json.JSONDecodeError):
                body = None
            is_chat = self.path.rstrip("/") in ("/v1/chat/completions", "/chat/completions")

            with state.lock:
                fault = server._pick_fault(body) if is_chat else "404"
                record = RecordedRequest(
                    index=len(state.requests),
                    method="POST",
                    path=self.path,
                    headers={k.lower(): v for k, v in self.headers.items()},
                    body=body if isinstance(body, dict) else None,
                    fault=fault,
                    started=time.monotonic(),
                )
                state.requests.append(record)
                state.in_flight += 1
                state.max_concurrent = max(state.max_concurrent, state.in_flight)
            try:
                self._answer_chat(record, fault)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client gave up (e.g. its own timeout); nothing to do
            finally:
                with state.lock:
                    state.in_flight -= 1
                    record.ended = time.monotonic()

        def _answer_chat(self, record: RecordedRequest, fault: str) -> None:
            if fault == "404":
                self._send_error_json(404, f"no route {self.path}")
                return
            if server.latency_s > 0 and server._stopping.wait(server.latency_s):
                self.close_connection = True
                return
            if server.require_key is not None and fault == "ok":
                if record.headers.get("authorization") != f"Bearer {server.require_key}":
                    record.fault = "401"
                    self._send_error_json(401, self._error_text(record, 401, "invalid or missing API key"))
                    return
            if fault == "ok" and record.body is None:
                record.fault = "400"
                self._send_error_json(400, "request body is not a JSON object")
                return

            if fault == "ok":
                self._send(200, json.dumps(server._completion(record.body)).encode())
            elif fault.isdigit():
                status = int(fault)
                headers = {}
                if status == 429 and server.retry_after is not None:
                    headers["Retry-After"] = f"{server.retry_after:g}"
                self._send_error_json(status, self._error_text(record, status, f"injected fault {status}"), headers)
            elif fault == "timeout":
                server._stopping.wait(server.hang_s)
                self.close_connection = True
            elif fault == "disconnect":
                self.close_connection = True
            elif fault == "truncated_json":
                full = json.dumps(server._completion(record.body or {})).encode()
                self._send(200, full[: len(full) // 2])
            elif fault == "bad_utf8":
                payload = json.dumps(server._completion(record.body or {})).encode()
                payload = payload.replace(b'"content": "', b'"content": "\xff\xfe\xc3(', 1)
                self._send(200, payload)
            elif fault == "no_content":
                completion = server._completion(record.body or {})
                completion["choices"] = []
                self._send(200, json.dumps(completion).encode())
            else:  # unreachable: kinds are checked in __init__
                raise AssertionError(fault)

        def _error_text(self, record: RecordedRequest, status: int, default: str) -> str:
            return server.error_message_fn(record, status) if server.error_message_fn else default

        def _record_simple(self, method: str) -> None:
            with state.lock:
                state.requests.append(
                    RecordedRequest(
                        index=len(state.requests),
                        method=method,
                        path=self.path,
                        headers={k.lower(): v for k, v in self.headers.items()},
                        body=None,
                        fault="ok",
                        started=time.monotonic(),
                        ended=time.monotonic(),
                    )
                )

    return Handler
