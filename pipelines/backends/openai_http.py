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
  Authorization header, and is scrubbed from every message this module produces.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Any, Dict, List, NoReturn, Optional, Sequence, Tuple, Union

import httpx
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt
from tqdm.auto import tqdm

from ..errors import PipelineError
from ..params.common import OpenAIBackend, Sampling
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
        self._lock = threading.Lock()
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
                payload = self._payload(conversations[i], sampling, sampling.seed + j, pfs[i], stop)
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
        try:
            resp = self._client.post(self.url, content=json.dumps(payload).encode("utf-8"))
        except httpx.TimeoutException as exc:
            self._fail("timeout", f"timeout after {self.cfg.timeout_s:g}s ({type(exc).__name__})")
        except httpx.TransportError as exc:  # connect refused, reset, server closed without answering, ...
            self._fail("connection", f"connection error ({type(exc).__name__}: {exc})")

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
        return content

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
        if self._key:
            text = text.replace(self._key, "***")
        return " ".join(text.split())


# ---------------------------------------------------------------------------- helpers
def _read_api_key(env_name: Optional[str]) -> Optional[str]:
    if env_name is None:
        return None
    value = os.environ.get(env_name, "").strip()
    if not value:
        raise PipelineError(f"openai backend: environment variable {env_name} (api_key_env) is unset or empty")
    return value


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
