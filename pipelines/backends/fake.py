"""A deterministic scripted backend: no model, instant, reproducible. For unit tests and smoke runs of the DAG.

It reads what it needs from the conversation the way a compliant model would: the first policy id in the system prompt
that looks like a heading (the spec chunk), and whether the user request is one it should refuse is decided by a hash,
so a fake run yields a mix of good and bad samples for the judge to sort.
"""
from __future__ import annotations

import hashlib
import re
import time
from typing import List, Optional, Sequence

from ..params.common import Sampling
from .base import Conversation, cut_at_stop, prefills

_HEADING_ID = re.compile(r"^## ([A-Z]{1,3}\.\d+) ", re.M)


def _h(*parts: object) -> int:
    return int(hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:12], 16)


class FakeChatBackend:
    name = "fake"

    def __init__(self, cfg=None):
        self.delay_s = getattr(cfg, "delay_s", 0.0)
        self.calls: List[int] = []  # number of conversations per generate() call

    def _one(self, conv: Conversation, i: int, sampling: Sampling, prefill: Optional[str]) -> str:
        system = next((m["content"] for m in conv if m["role"] == "system"), "")
        user = next((m["content"] for m in reversed(conv) if m["role"] == "user"), "")
        h = _h(user, sampling.seed, i)
        if prefill and prefill.strip().lower().startswith("score"):
            return f" {h % 11}\nRationale: scripted grade {h % 97}."
        ids = _HEADING_ID.findall(system)
        pid = ids[h % len(ids)] if ids else "X.1"
        kind = h % 4
        if kind == 3:  # a malformed sample: rambles without closing the thought
            return ("" if prefill else "<think>") + "I am not sure what to do here and I keep thinking"
        cot, answer = {
            0: (f"The request falls under policy {pid}. That policy asks for a hard refusal, so I decline briefly.",
                "I'm sorry, but I can't help with that."),
            1: (f"Policy {pid} applies. It allows this, so I answer helpfully and directly.",
                "Here is a clear, factual answer to your question, with the general background, the main points "
                "to keep in mind, and where to read more about it."),
            2: ("As the policy above says, I should answer.", "Sure."),
        }[kind]
        if prefill and prefill.rstrip().endswith("</think>"):  # answer phase of structured generation
            return answer
        body = f"{cot}\n</think>\n{answer}"
        return body if prefill else f"<think>\n{body}"

    def generate(self, conversations: Sequence[Conversation], n: int, sampling: Sampling,
                 prefill=None, progress: bool = True, stop: Optional[Sequence[str]] = None) -> List[List[str]]:
        self.calls.append(len(conversations))
        if self.delay_s:
            time.sleep(self.delay_s)
        pfs = prefills(prefill, len(conversations))
        return [[cut_at_stop(self._one(c, i, sampling, pf), stop) for i in range(n)] for c, pf in zip(conversations, pfs)]

    def close(self) -> None:
        pass
