"""Chat backends: local transformers, OpenAI-compatible HTTP, deterministic fake. `make_backend(cfg)` picks one."""
from __future__ import annotations

from ..params.common import Backend
from .base import ChatBackend, Conversation, Message  # noqa: F401


def make_backend(cfg: Backend) -> ChatBackend:
    if cfg.kind == "fake":
        from .fake import FakeChatBackend

        return FakeChatBackend(cfg)
    if cfg.kind == "openai":
        from .openai_http import OpenAIChatBackend

        return OpenAIChatBackend(cfg)
    from .local import TransformersChatBackend

    return TransformersChatBackend(cfg)
