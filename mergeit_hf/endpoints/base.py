"""What every endpoint gives stage 2: a reply, and the chat and completion interfaces servers implement."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

#: Requests in flight when a server does not say how many it takes.
DEFAULT_CONCURRENCY = 8


@dataclass(frozen=True)
class ChatReply:
    """The generated text and, when asked for, the top alternatives at the first generated position."""

    content: str
    first_top_logprobs: tuple[tuple[str, float], ...] = ()
    finish_reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "content": self.content,
            "first_top_logprobs": [list(pair) for pair in self.first_top_logprobs],
            "finish_reason": self.finish_reason,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChatReply:
        pairs = tuple((str(token), float(logprob)) for token, logprob in data["first_top_logprobs"])
        return cls(data["content"], pairs, data.get("finish_reason"))


class ChatBackend(Protocol):
    model_id: str
    default_concurrency: int

    async def chat(self, messages: list[dict[str, str]], params: dict[str, Any]) -> ChatReply: ...

    async def aclose(self) -> None: ...


class CompletionBackend(Protocol):
    """A server answering raw prompts (no chat template): ``completions.CompletionEndpointBackend``."""

    model_id: str
    default_concurrency: int

    async def complete(self, prompt: str, params: dict[str, Any]) -> ChatReply: ...

    async def aclose(self) -> None: ...


def json_response_format(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema in the form each server reads: TGI takes ``value``, llama.cpp's server ``schema``."""
    return {"type": "json_object", "value": schema, "schema": schema}
