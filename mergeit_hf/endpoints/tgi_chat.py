"""A TGI-compatible chat server (``/v1/chat/completions``, the Messages API): TGI, vLLM, llama.cpp's server and
HF Inference Endpoints all serve it. The client is huggingface_hub's ``AsyncInferenceClient``; transient
failures (429 "Model is overloaded", 503, 424, timeouts, dropped connections) are retried with exponential
backoff and jitter, honouring ``Retry-After``.
"""

from __future__ import annotations

from typing import Any

from mergeit_hf.endpoints.base import DEFAULT_CONCURRENCY, ChatReply
from mergeit_hf.endpoints.transport import failure, probe_server, retrying, token_from_environment
from mergeit_hf.errors import EndpointError

_HTTPX_DEFAULT_CONNECTIONS = 100


class EndpointBackend:
    """A TGI-compatible server at ``url``; the token comes from the argument, ``HF_TOKEN`` or the login."""

    def __init__(self, url: str, *, token: str | None = None, timeout_s: float = 120.0, attempts: int = 6):
        from huggingface_hub import AsyncInferenceClient

        self.url = url.rstrip("/")
        self._token = token if token is not None else token_from_environment()
        self._client = AsyncInferenceClient(base_url=self.url, token=self._token, timeout=timeout_s)
        self._timeout_s = timeout_s
        self._attempts = attempts
        self.model_id = self.url
        self.default_concurrency = DEFAULT_CONCURRENCY

    def __repr__(self) -> str:  # never show the token
        return f"EndpointBackend(url={self.url!r})"

    async def probe(self) -> None:
        """Fail fast on an unreachable endpoint; read model id and concurrency from ``/info``."""
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            raise EndpointError(
                f"HF_HUB_OFFLINE is set, and huggingface_hub then refuses every InferenceClient call, even to "
                f"{self.url}. Unset it for stage 2 (the embedding model loads offline without it)."
            )
        server = await probe_server(self.url, self._token, "LLM endpoint", self._timeout_s)
        self.model_id, self.default_concurrency = server.model_id, server.concurrency

    async def size_pool(self, connections: int) -> None:
        """Let ``connections`` requests be in flight at once.

        huggingface_hub's client keeps httpx's default pool of 100 connections, fewer than TGI's default
        128 slots: measured, a 128-slot server then never held more than 100 requests. Before the client's
        first request, its session is replaced by the same one (hub's request and response hooks) with a
        pool as large as the concurrency. Where the client's internals differ, its default pool stays.
        """
        if connections <= _HTTPX_DEFAULT_CONNECTIONS or getattr(self._client, "_async_client", "other") is not None:
            return
        try:
            import httpx2
            from huggingface_hub.utils._http import async_hf_request_event_hook, async_hf_response_event_hook
        except ImportError:
            return
        hooks = {"request": [async_hf_request_event_hook], "response": [async_hf_response_event_hook]}
        limits = httpx2.Limits(max_connections=connections, max_keepalive_connections=connections)
        session = httpx2.AsyncClient(event_hooks=hooks, follow_redirects=True, timeout=None, limits=limits)
        self._client._async_client = await self._client.exit_stack.enter_async_context(session)

    async def chat(self, messages: list[dict[str, str]], params: dict[str, Any]) -> ChatReply:
        try:
            async for attempt in retrying(self._attempts):
                with attempt:
                    output = await self._client.chat_completion(messages=messages, **params)
        except Exception as exc:
            raise failure(self.url, exc, self._token) from None
        return _reply_from_output(output)

    async def aclose(self) -> None:
        close = getattr(self._client, "close", None)
        if close is not None:
            await close()


def _reply_from_output(output: Any) -> ChatReply:
    choice = output.choices[0]
    content = choice.message.content or ""
    logprobs = getattr(choice, "logprobs", None)
    tops: tuple[tuple[str, float], ...] = ()
    entries = getattr(logprobs, "content", None) if logprobs is not None else None
    if entries:
        first = entries[0]
        alternatives = list(getattr(first, "top_logprobs", None) or [])
        tops = tuple((alt.token, float(alt.logprob)) for alt in alternatives) or ((first.token, float(first.logprob)),)
    return ChatReply(content, tops, getattr(choice, "finish_reason", None))
