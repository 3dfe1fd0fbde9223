"""One interface for "chat completion with n samples", shared by generation, judging, RL reward and evaluation."""
from __future__ import annotations

from typing import Dict, List, Optional, Protocol, Sequence, Union

from ..params.common import Sampling

Message = Dict[str, str]  # {"role": "system"|"user"|"assistant", "content": "..."}
Conversation = List[Message]


class ChatBackend(Protocol):
    """Given conversations, return `n` completions for each, in input order.

    `prefill`, when given, is text the assistant turn already starts with (e.g. "<think>\\n"); the returned
    completions continue it and do NOT repeat it. A list gives one prefill per conversation.
    `stop`: strings that end a completion; the returned text is cut before the first one. `sampling.seed` makes sampling reproducible: the same
    call (conversations, n, sampling) gives the same completions again. Callers that resume work in pieces (shards)
    therefore keep each piece's composition fixed and derive its seed from the piece's index.
    """

    name: str

    def generate(
        self,
        conversations: Sequence[Conversation],
        n: int,
        sampling: Sampling,
        prefill: Union[None, str, Sequence[str]] = None,
        progress: bool = True,
        stop: Optional[Sequence[str]] = None,
    ) -> List[List[str]]: ...

    def close(self) -> None: ...


def prefills(prefill: Union[None, str, Sequence[str]], count: int) -> List[Optional[str]]:
    """Normalise the `prefill` argument to one entry per conversation."""
    if prefill is None or isinstance(prefill, str):
        return [prefill] * count
    if len(prefill) != count:
        raise ValueError(f"{len(prefill)} prefills for {count} conversations")
    return list(prefill)


def cut_at_stop(text: str, stop: Optional[Sequence[str]]) -> str:
    """Cut `text` before the earliest stop string (servers and HF generate may include it)."""
    if not stop:
        return text
    ends = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return text[: min(ends)] if ends else text
