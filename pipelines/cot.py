"""Split a sample into chain of thought and answer: `<think> ... </think> answer`.

Small models drift from the format, so parsing is lenient where the intent is clear (a missing opening tag when the
generation was prefilled, stray whitespace) and flags the rest instead of failing: a bad sample is data, not a crash.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

OPEN, CLOSE = "<think>", "</think>"
_OPEN_RE = re.compile(r"<\s*think\s*>", re.I)
_CLOSE_RE = re.compile(r"<\s*/\s*think\s*>", re.I)


@dataclass(frozen=True)
class Parsed:
    cot: str
    answer: str
    ok: bool
    problem: Optional[str] = None  # why not ok: no_close_tag, empty_cot, empty_answer, nested_think


def split_cot(text: str) -> Parsed:
    """Return (cot, answer, ok, problem). Never raises."""
    text = text or ""
    closes = list(_CLOSE_RE.finditer(text))
    if not closes:
        return Parsed(cot=_OPEN_RE.sub("", text).strip(), answer="", ok=False, problem="no_close_tag")
    close = closes[0]
    head, answer = text[: close.start()], text[close.end():]
    opens = list(_OPEN_RE.finditer(head))
    cot = head[opens[-1].end():] if opens else head  # no opening tag: the prompt prefilled it
    answer = _CLOSE_RE.sub("", _OPEN_RE.sub("", answer)).strip()
    cot = cot.strip()
    if len(opens) > 1 or len(closes) > 1:
        return Parsed(cot, answer, False, "nested_think")
    if not cot:
        return Parsed(cot, answer, False, "empty_cot")
    if not answer:
        return Parsed(cot, answer, False, "empty_answer")
    return Parsed(cot, answer, True, None)


def join_cot(cot: str, answer: str) -> str:
    """The assistant turn the model is trained to produce."""
    return f"{OPEN}\n{cot.strip()}\n{CLOSE}\n{answer.strip()}"
