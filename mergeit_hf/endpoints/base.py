"""What every endpoint gives stage 2: a reply, and the chat and completion interfaces servers implement."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from mergeit_hf.errors import MalformedAnswerError

#: Requests in flight when a server does not say how many it takes.
DEFAULT_CONCURRENCY = 8


@dataclass(frozen=True)
class ChatReply:
    """The generated text and, when asked for, the top alternatives at the first generated position."""

    content: str
    first_top_logprobs: tuple[tuple[str, float], ...] = ()
    finish_reason: str | None = None
    usage: tuple[int, int] | None = None  # (prompt tokens, completion tokens), where the server reports them

    def to_dict(self) -> dict[str, Any]:
        return {
            "content": self.content,
            "first_top_logprobs": [list(pair) for pair in self.first_top_logprobs],
            "finish_reason": self.finish_reason,
            "usage": list(self.usage) if self.usage else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChatReply:
        pairs = tuple((str(token), float(logprob)) for token, logprob in data["first_top_logprobs"])
        usage = data.get("usage")  # absent from replies cached before tokens were counted
        return cls(data["content"], pairs, data.get("finish_reason"), (int(usage[0]), int(usage[1])) if usage else None)


def usage_of(answer: Any) -> tuple[int, int] | None:
    """(prompt tokens, completion tokens) from an answer's ``usage`` (a dict or an object), where reported."""
    usage = answer.get("usage") if isinstance(answer, dict) else getattr(answer, "usage", None)
    if not usage:
        return None
    read = usage.get if isinstance(usage, dict) else lambda name: getattr(usage, name, None)
    prompt, completion = read("prompt_tokens"), read("completion_tokens")
    if prompt is None and completion is None:
        return None
    return int(prompt or 0), int(completion or 0)


def reply_from_chat_completion(answer: Mapping[str, Any]) -> ChatReply:
    """A chat completion in OpenAI's schema: a server's JSON, llama.cpp's dict, or huggingface_hub's output
    (its types are dicts too), with the first position's top logprobs (else the chosen token) and usage."""
    if not answer.get("choices") and answer.get("error"):  # an error object with a success status
        error = answer["error"]
        said = error.get("message") if isinstance(error, Mapping) else error
        raise MalformedAnswerError(f"answered with an error object ({said})")
    choice = answer["choices"][0]
    content = (choice.get("message") or {}).get("content") or ""
    entries = (choice.get("logprobs") or {}).get("content") or []
    tops: tuple[tuple[str, float], ...] = ()
    if entries:
        first = entries[0]
        tops = tuple((alt["token"], float(alt["logprob"])) for alt in first.get("top_logprobs") or [])
        tops = tops or ((first["token"], float(first["logprob"])),)
    return ChatReply(content, tops, choice.get("finish_reason"), usage_of(answer))


@dataclass
class TokenUsage:
    """Tokens the replies of one piece of work (a pair) used, as their servers reported them."""

    prompt: int = 0
    completion: int = 0
    replies: int = 0  # replies that reported usage

    def add(self, usage: tuple[int, int] | None) -> None:
        if usage is not None:
            self.prompt += usage[0]
            self.completion += usage[1]
            self.replies += 1


class AttemptObserver(Protocol):
    """Told of every HTTP attempt a backend makes (``sending.limit.EndpointLoad`` is one): what the adaptive
    limit reads, and what the run's counts of requests, retries and throttles come from."""

    def attempt(self, first: bool) -> None: ...

    def answered(self, status: int | None, latency_s: float, headers: Mapping[str, str] | None = None) -> None: ...

    # What a server says it holds, and how many tokens it has generated so far (None: it does not say).
    def server_queue(self, running: float, waiting: float, generated_tokens: float | None = None) -> None: ...

    # When the server last generated more tokens (``time.monotonic``); None while it has not said. A request
    # outlives request_timeout_s while it moves: a busy server is slow, not dead.
    @property
    def progressed_at(self) -> float | None: ...

    def count_kept_past_timeout(self) -> None: ...  # one request answered after request_timeout_s, kept so


class ChatBackend(Protocol):
    model_id: str  # the name every request carries (and the request cache keys on)
    default_concurrency: int  # announced by the server (``concurrency_announced``), else where the limit starts
    concurrency_announced: bool

    def describe(self) -> dict[str, str]: ...  # kind, model as a card may show it, structured output

    async def chat(self, messages: list[dict[str, str]], params: dict[str, Any]) -> ChatReply: ...

    async def aclose(self) -> None: ...


class CompletionBackend(Protocol):
    """A server answering raw prompts (no chat template): ``completions.CompletionEndpointBackend``."""

    model_id: str
    default_concurrency: int
    concurrency_announced: bool

    def describe(self) -> dict[str, str]: ...

    async def complete(self, prompt: str, params: dict[str, Any]) -> ChatReply: ...

    async def aclose(self) -> None: ...
