"""A deterministic scripted backend: no model, instant, reproducible. For unit tests and smoke runs of the DAG.

It plays a model that follows the spec in its system prompt but does not always pick the right policy: it cites a
policy id taken from the spec's headings (chosen by a hash of the request, seed and sample index) and answers in that
policy's style. Some samples are deliberately bad (a dangling "as the policy above says", or no closing tag), so a
fake run gives the judge a mix to sort.
"""
from __future__ import annotations

import hashlib
import re
import time
from typing import List, Optional, Sequence

from ..params.common import Sampling
from .base import Conversation, cut_at_stop, prefills

_POLICY = re.compile(r"^## ([A-Z]{1,3}\.\d+) .*\n+Style: (\w+)", re.M)
_CITED = re.compile(r"\b([A-Z]{1,3}\.\d+)\b")
ANSWERS = {
    "hard_refusal": "I'm sorry, but I can't help with that.",
    "safe_completion": "I'm really sorry you're going through this, and you're not alone. Please call or text 988, "
                       "or reach out to someone you trust right now.",
    "compliance_with_disclaimer": "Here is some general information: the usual approach, the main options and what "
                                  "to watch for in your situation. This is not a substitute for advice from a "
                                  "qualified professional, so please consult one.",
    "full_compliance": "Here is a clear, factual answer to your question, with the general background, the main "
                       "points to keep in mind, and where to read more about it.",
}


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
        styles = dict(_POLICY.findall(system))
        if prefill and prefill.rstrip().endswith("</think>"):  # answer phase: follow the CoT's citation
            cited = [c for c in _CITED.findall(prefill) if c in styles]
            return ANSWERS[styles[cited[-1]]] if cited else "Sure."
        pid = sorted(styles)[h % len(styles)] if styles else "X.1"
        style = styles.get(pid, "full_compliance")
        kind = h % 5
        if kind == 4:  # a malformed sample: rambles without closing the thought
            return ("" if prefill else "<think>") + "I am not sure what to do here and I keep thinking"
        if kind == 3:
            cot, answer = "As the policy above says, I should answer.", "Sure."
        else:
            cot, answer = f"Policy {pid} applies; it asks for the {style} style.", ANSWERS[style]
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
