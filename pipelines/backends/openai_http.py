"""Chat backend for any OpenAI-compatible `/chat/completions` server (vLLM, llama.cpp server, a hosted API).

    backend = OpenAIChatBackend(OpenAIBackend(kind="openai", base_url="http://127.0.0.1:8000/v1", model="m"))
    outs = backend.generate([[{"role": "user", "content": "hi"}]], n=4, sampling=Sampling(seed=1), prefill="<think>\\n")
    backend.stats   # {"requests": 4, "succeeded": 4, "retries": 0, "failed_calls": 0, "errors": {}}
    backend.close()

Design choices:
- One request per (conversation, sample index), each with `n: 1` and `seed = sampling.seed + sample_index`: the result
  does not depend on batching or on whether the server honours `n`, and a rerun asks for exactly the same thing.
- At most `cfg.concurrency` requests in flight (a thread pool sharing one httpx.Client); results keep input order.
- Retries (tenacity) on 429, 5xx, timeouts, connection errors and garbled answers (body not UTF-8, not JSON, or no
  `choices[0].message.content`), waiting `backoff_s * 2**k` before retry k+1, or the server's `Retry-After` on a 429
  when it is at most RETRY_AFTER_MAX_S. Any other 4xx (bad key, bad request) fails at once: retrying cannot fix it.
- The API key is read only from the environment variable named by `cfg.api_key_env`, is sent only in the
  Authorization header, and is scrubbed from every message this module produces and from every completion it
  returns (a server may echo the header back in a 200 reply); it is also registered with `pipelines.io`, whose
  writers scrub it from every file they write.
- One deadline per attempt: `timeout_s` bounds the whole attempt (connect, send, headers, body), not each socket
  read. httpx's timeouts are per read, so a server that trickles one byte at a time, or stalls after the headers,
  could hold a request for ever; every socket operation here gets at most the time left to the deadline.
- Completions are text: a lone surrogate (a JSON "\\ud800" escape, not a character) becomes U+FFFD.
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Any, Dict, List, NoReturn, Optional, Sequence, Tuple, Union

import httpcore
import httpx
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt
from tqdm.auto import tqdm

from ..errors import PipelineError
from ..io import register_secret
from ..params.common import ENV_VAR_NAME, OpenAIBackend, Sampling
from .base import Conversation, cut_at_stop, prefills

log = logging.getLogger(__name__)

RETRY_AFTER_MAX_S = 30.0  # a larger Retry-After is ignored in favour of our own backoff
MAX_DELAY_S = 120.0  # cap on one backoff wait, whatever max_retries is
SNIPPET_CHARS = 120  # how much of an error body goes into a message


class _Retryable(Exception):
    """A failed attempt worth repeating. `kind` keys the stats; `retry_after` is the server's hint in seconds."""

    def __init__(self, kind: str, problem: str, retry_after: Optional[float] = None) -> None:
        super().__init__(problem)
        self.kind = kind
        self.problem = problem
        self.retry_after = retry_after


class _Fatal(Exception):
    """A failed attempt that retrying cannot fix (4xx other than 429)."""

    def __init__(self, kind: str, problem: str) -> None:
        super().__init__(problem)
        self.kind = kind
        self.problem = problem


class _Cancelled(Exception):
    """Another request of the same generate() call failed for good; stop this one quietly."""


class OpenAIChatBackend:
    """`ChatBackend` over HTTP. See the module docstring for the request, retry and key-handling rules.

    Attributes:
        name: "openai:<model>@<base_url>", for logs and provenance.
        stats: counters since construction: requests (HTTP attempts), succeeded, retries, failed_calls
            (generate() calls that raised), errors {kind: count} with kinds like "http_429", "http_503",
            "timeout", "connection", "invalid_json", "invalid_utf8", "no_content", "http_401".
    """

    def __init__(self, cfg: OpenAIBackend) -> None:
        self.cfg = cfg
        self.base_url = cfg.base_url.rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.name = f"openai:{cfg.model}@{self.base_url}"
        self._key = _read_api_key(cfg.api_key_env)
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
        self._client = httpx.Client(headers=headers, timeout=httpx.Timeout(cfg.timeout_s), limits=limits)
        _bound_by_deadline(self._client)
        self._lock = threading.Lock()
        self._structured: Optional[bool] = None  # does the server take response_format json_schema? (unknown yet)
        self.stats: Dict[str, Any] = {"requests": 0, "succeeded": 0, "retries": 0, "failed_calls": 0, "errors": {}}

    # ------------------------------------------------------------------ public API
    def generate(
        self,
        conversations: Sequence[Conversation],
        n: int,
        sampling: Sampling,
        prefill: Union[None, str, Sequence[str]] = None,
        progress: bool = True,
        stop: Optional[Sequence[str]] = None,
        extra_body: Optional[Dict[str, Any]] = None,
    ) -> List[List[str]]:
        """Return `n` completions per conversation, in input order.

        Args:
            conversations: chat message lists ({"role", "content"} dicts); not modified.
            n: samples per conversation; sample j is requested with seed `sampling.seed + j`.
            sampling: temperature, top_p, max_new_tokens (sent as max_tokens) and seed.
            prefill: text the assistant turn starts with; sent as a final assistant message to be continued, and
                never repeated at the start of a returned completion. A list gives one prefill per conversation.
            progress: show a tqdm bar over requests.
            stop: stop strings, sent as `stop` and also applied to the returned text.
            extra_body: more request fields (e.g. `response_format`), sent as given.

        Returns:
            out[i][j] = completion j of conversation i.

        Raises:
            PipelineError: a request failed for good (retries used up, or a non-retryable 4xx), or bad arguments.
        """
        if n < 1:
            raise PipelineError(f"{self.name}: n must be >= 1, got {n}")
        pfs = prefills(prefill, len(conversations))
        jobs = [(i, j) for i in range(len(conversations)) for j in range(n)]
        results: List[List[Optional[str]]] = [[None] * n for _ in conversations]
        if not jobs:
            return []
        cancel = threading.Event()
        bar = tqdm(total=len(jobs), desc=f"{self.cfg.model} requests", unit="req", disable=not progress)
        pool = ThreadPoolExecutor(max_workers=min(self.cfg.concurrency, len(jobs)), thread_name_prefix="openai-http")
        try:
            futures: Dict[Future, Tuple[int, int]] = {}
            for i, j in jobs:
                payload = {**self._payload(conversations[i], sampling, sampling.seed + j, pfs[i], stop),
                           **(extra_body or {})}
                futures[pool.submit(self._request_with_retries, payload, cancel)] = (i, j)
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for fut in done:
                    exc = fut.exception()
                    if exc is not None:
                        raise exc
                    i, j = futures[fut]
                    results[i][j] = cut_at_stop(_strip_prefill(fut.result(), pfs[i]), stop)
                    bar.update(1)
        except BaseException:
            with self._lock:
                self.stats["failed_calls"] += 1
            cancel.set()  # wake sleeping retries of the other requests and stop them
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
        return [[str(text) for text in row] for row in results]

    def generate_structured(self, conversations: Sequence[Conversation], schema: Dict[str, Any], name: str,
                            sampling: Sampling, progress: bool = False) -> Tuple[List[str], bool]:
        """One completion per conversation, constrained to a JSON schema through `response_format` (json_schema; vLLM,
        llama.cpp server and the OpenAI API accept it). A server that rejects the field (HTTP 400 or 422) is
        remembered and asked again without it. Returns (texts, whether the schema was enforced)."""
        if self._structured is not False:
            fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
            try:
                outs = self.generate(conversations, 1, sampling, progress=progress,
                                     extra_body={"response_format": fmt})
                self._structured = True
                return [o[0] for o in outs], True
            except PipelineError as e:
                if self._structured is True or not re.search(r"HTTP (?:400|422)\b", str(e)):
                    raise
                log.warning("%s: the server rejects response_format json_schema; grading from free text", self.url)
                self._structured = False
        return [o[0] for o in self.generate(conversations, 1, sampling, progress=progress)], False

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "OpenAIChatBackend":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:  # never shows the key
        return f"OpenAIChatBackend({self.name!r})"

    # ------------------------------------------------------------------ one request
    def _payload(self, conversation: Conversation, sampling: Sampling, seed: int, prefill: Optional[str],
                 stop: Optional[Sequence[str]] = None) -> dict:
        messages = [dict(m) for m in conversation]  # copy: the caller's list stays as it was
        payload: Dict[str, Any] = {
            "model": self.cfg.model,
            "messages": messages,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_new_tokens,
            "seed": seed,
            "n": 1,
        }
        if stop:
            payload["stop"] = list(stop)
        if sampling.repetition_penalty != 1.0:  # not in the OpenAI API; vLLM and llama.cpp servers read it
            payload["repetition_penalty"] = sampling.repetition_penalty
        if prefill is not None:
            messages.append({"role": "assistant", "content": prefill})
            # vLLM's extension for continuing the last assistant turn; other servers ignore unknown keys.
            payload["continue_final_message"] = True
            payload["add_generation_prompt"] = False
        return payload

    def _request_with_retries(self, payload: dict, cancel: threading.Event) -> str:
        """POST one payload, retrying transient failures; return the completion text or raise PipelineError."""
        attempts = 0

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            with self._lock:
                self.stats["retries"] += 1
            log.debug("%s: retry %d after %s", self.url, state.attempt_number, getattr(exc, "problem", exc))

        retrying = Retrying(
            retry=retry_if_exception_type(_Retryable),
            stop=stop_after_attempt(self.cfg.max_retries + 1),
            wait=self._wait,
            sleep=lambda seconds: _sleep_unless_cancelled(seconds, cancel),
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    if cancel.is_set():
                        raise _Cancelled()
                    attempts += 1
                    return self._attempt(payload)
        except _Retryable as exc:
            raise PipelineError(
                self._scrub(
                    f"{self.url}: gave up after {attempts} attempts "
                    f"({self.cfg.max_retries} retries); last problem: {exc.problem}"
                )
            ) from None
        except _Fatal as exc:
            raise PipelineError(
                self._scrub(f"{self.url}: {exc.problem} after {attempts} attempt(s); not retried")
            ) from None
        raise AssertionError("unreachable: tenacity either returns or raises")

    def _attempt(self, payload: dict) -> str:
        """One HTTP round trip. Returns the content or raises _Retryable / _Fatal."""
        with self._lock:
            self.stats["requests"] += 1
        _deadline.at = time.monotonic() + self.cfg.timeout_s  # read by _DeadlineStream on this thread
        try:
            resp = self._client.post(self.url, content=json.dumps(payload).encode("utf-8"))
        except httpx.TimeoutException as exc:
            self._fail("timeout", f"timeout after {self.cfg.timeout_s:g}s ({type(exc).__name__})")
        except httpx.TransportError as exc:  # connect refused, reset, server closed without answering, ...
            self._fail("connection", f"connection error ({type(exc).__name__}: {exc})")
        finally:
            _deadline.at = None

        status = resp.status_code
        if status == 429 or status >= 500:
            self._fail(f"http_{status}", f"HTTP {status}{_error_snippet(resp)}", _retry_after(resp))
        if status >= 400 or status < 200:
            self._fail(f"http_{status}", f"HTTP {status}{_error_snippet(resp)}", fatal=True)
        try:
            text = resp.content.decode("utf-8")  # strict: a mangled body is a failed attempt, not "\ufffd" text
        except UnicodeDecodeError:
            self._fail("invalid_utf8", f"HTTP {status} body is not valid UTF-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            self._fail("invalid_json", f"HTTP {status} body is not valid JSON ({exc.msg} at char {exc.pos})")
        content = _content_of(data)
        if content is None:
            self._fail("no_content", f"HTTP {status} JSON has no choices[0].message.content")
        with self._lock:
            self.stats["succeeded"] += 1
        # What the server sent is data we keep (shards, results.json): never the key, never a non-character.
        return self._scrub_key(_LONE_SURROGATE.sub("\ufffd", content))

    def _fail(self, kind: str, problem: str, retry_after: Optional[float] = None, fatal: bool = False) -> NoReturn:
        with self._lock:
            self.stats["errors"][kind] = self.stats["errors"].get(kind, 0) + 1
        problem = self._scrub(problem)
        if fatal:
            raise _Fatal(kind, problem)
        raise _Retryable(kind, problem, retry_after)

    def _wait(self, state: RetryCallState) -> float:
        """Seconds before the next attempt: the server's small Retry-After, else backoff_s * 2**(attempt-1)."""
        exc = state.outcome.exception() if state.outcome else None
        hint = getattr(exc, "retry_after", None)
        if hint is not None and 0 <= hint <= RETRY_AFTER_MAX_S:
            return hint
        return min(self.cfg.backoff_s * 2 ** (state.attempt_number - 1), MAX_DELAY_S)

    def _scrub(self, text: str) -> str:
        """Remove the API key from text (a server might echo it back) and keep the message on one line."""
        return " ".join(self._scrub_key(text).split())

    def _scrub_key(self, text: str) -> str:
        """`text` with the API key, raw or JSON-escaped, replaced by '***' (layout kept)."""
        if self._key:
            text = text.replace(self._key, "***")
            escaped = json.dumps(self._key)[1:-1]
            if escaped != self._key:
                text = text.replace(escaped, "***")
        return text


# ---------------------------------------------------------------------------- helpers
def _read_api_key(env_name: Optional[str]) -> Optional[str]:
    if env_name is None:
        return None
    if not re.fullmatch(ENV_VAR_NAME, env_name):  # probably the key itself, pasted in the wrong place: never print it
        raise PipelineError("openai backend: api_key_env must be the NAME of an environment variable (upper case, "
                            "e.g. MY_API_KEY), not the key itself; the value given is not shown")
    value = os.environ.get(env_name, "").strip()
    if not value:
        raise PipelineError(f"openai backend: environment variable {env_name} (api_key_env) is unset or empty")
    register_secret(value)  # pipelines.io's writers scrub it from every file
    return value


# ---------------------------------------------------------------------------- one deadline per attempt
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_deadline = threading.local()  # .at: time.monotonic() by which the current thread's attempt must be over


def _time_left(timeout: Optional[float], kind: type) -> Optional[float]:
    """The socket timeout for one operation: httpx's per-operation `timeout`, cut to what is left of this thread's
    attempt deadline; raises `kind` (an httpcore timeout) once the deadline has passed."""
    at = getattr(_deadline, "at", None)
    if at is None:
        return timeout
    left = at - time.monotonic()
    if left <= 0:
        raise kind("request deadline passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A connection whose every read and write ends by the deadline of the attempt using it."""

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: Optional[float] = None) -> bytes:
        return self._inner.read(max_bytes, _time_left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: Optional[float] = None) -> None:
        self._inner.write(buffer, _time_left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context, server_hostname=None, timeout=None) -> httpcore.NetworkStream:
        return _DeadlineStream(
            self._inner.start_tls(ssl_context, server_hostname, _time_left(timeout, httpcore.ConnectTimeout)))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    """httpcore's network backend, with connects bounded by the deadline and streams wrapped in _DeadlineStream."""

    def __init__(self, inner: httpcore.NetworkBackend) -> None:
        self._inner = inner

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        return _DeadlineStream(self._inner.connect_tcp(
            host, port, timeout=_time_left(timeout, httpcore.ConnectTimeout), local_address=local_address,
            socket_options=socket_options))

    def connect_unix_socket(self, path, timeout=None, socket_options=None):
        return _DeadlineStream(self._inner.connect_unix_socket(
            path, timeout=_time_left(timeout, httpcore.ConnectTimeout), socket_options=socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def _bound_by_deadline(client: httpx.Client) -> None:
    """Put _DeadlineBackend under every connection pool of `client` (its transport and any proxy mounts, so
    proxies from the environment keep working). httpx has no public hook for this; tests/test_hostile_http.py
    fails if these attributes change."""
    transports = [client._transport, *client._mounts.values()]  # noqa: SLF001
    pools = [getattr(t, "_pool", None) for t in transports if t is not None]
    wrapped = 0
    for pool in pools:
        backend = getattr(pool, "_network_backend", None)
        if backend is not None:
            if not isinstance(backend, _DeadlineBackend):
                pool._network_backend = _DeadlineBackend(backend)  # noqa: SLF001
            wrapped += 1
    if not wrapped:  # keep working (per-read timeouts only) rather than refuse every HTTP run after an upgrade
        log.warning("openai backend: cannot install the per-request deadline in this httpx version; timeout_s "
                    "bounds each socket read only (pipelines/backends/openai_http.py _bound_by_deadline)")


def _sleep_unless_cancelled(seconds: float, cancel: threading.Event) -> None:
    if cancel.wait(seconds):
        raise _Cancelled()


def _retry_after(resp: httpx.Response) -> Optional[float]:
    """Retry-After in seconds, only on 429 and only in its delta-seconds form."""
    if resp.status_code != 429:
        return None
    try:
        return float(resp.headers.get("retry-after", ""))
    except ValueError:
        return None


def _error_snippet(resp: httpx.Response) -> str:
    """': <server's error message>' (OpenAI error JSON or raw text), shortened; '' if there is none."""
    text = resp.content.decode("utf-8", errors="replace")
    try:
        err = json.loads(text).get("error")
        msg = err.get("message") if isinstance(err, dict) else err
        if msg:
            text = str(msg)
    except (json.JSONDecodeError, AttributeError):
        pass
    text = " ".join(text.split())
    if not text:
        return ""
    return ": " + (text[:SNIPPET_CHARS] + "..." if len(text) > SNIPPET_CHARS else text)


def _content_of(data: Any) -> Optional[str]:
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None


def _strip_prefill(content: str, prefill: Optional[str]) -> str:
    """Drop a prefill the server echoed back (servers that ignore continue_final_message may do so)."""
    if prefill and content.startswith(prefill):
        return content[len(prefill):]
    return content
