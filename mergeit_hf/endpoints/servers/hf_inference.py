"""The servers huggingface_hub's ``AsyncInferenceClient`` speaks to: TGI (a server that answers ``/info``)
and HF Inference Providers. TGI reads structured output as its grammar, into which the client rewrites
OpenAI's ``json_schema``; a provider gets ``json_schema`` as it is, routed by huggingface_hub with the HF
token. Transient failures are retried as for every endpoint (``transport``)."""

from __future__ import annotations

import time
from typing import Any

from mergeit_hf.endpoints.base import DEFAULT_CONCURRENCY, AttemptObserver, ChatReply, reply_from_chat_completion
from mergeit_hf.endpoints.http.pools import SpreadTransport, proxied
from mergeit_hf.endpoints.http.transport import failure, http_status, read_answer, retrying
from mergeit_hf.endpoints.probe import ServerInfo, model_label
from mergeit_hf.errors import EndpointError, MalformedAnswerError

_HTTPX_DEFAULT_CONNECTIONS = 100


class InferenceClientBackend:
    """Chat completions through ``AsyncInferenceClient``: a TGI server at ``url``, or ``provider`` routing."""

    def __init__(
        self,
        model: str,
        key: str | None,
        *,
        url: str | None = None,
        provider: str | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        announced: bool = False,
        timeout_s: float = 120.0,
        attempts: int = 6,
        key_variable: str = "MERGEIT_API_KEY",
    ):
        from huggingface_hub import AsyncInferenceClient, constants

        if constants.HF_HUB_OFFLINE:
            raise EndpointError(
                f"HF_HUB_OFFLINE is set, and huggingface_hub then refuses every InferenceClient call, even to "
                f"{url or provider}. Unset it for stage 2 (the embedding model loads offline without it)."
            )
        self.url = url
        self.provider = provider
        self._key = key
        self._key_variable = key_variable
        self._attempts = attempts
        self._where = url or f"HF Inference Providers ({provider})"
        if url:
            self._client = AsyncInferenceClient(base_url=url, api_key=key, timeout=timeout_s)
        else:
            self._client = AsyncInferenceClient(provider=provider, api_key=key, timeout=timeout_s)  # type: ignore[arg-type]
        self.model_id = model
        self.default_concurrency = concurrency
        self.concurrency_announced = announced
        self._load: AttemptObserver | None = None

    @classmethod
    def for_tgi(cls, url: str, server: ServerInfo, key: str | None, **options: Any) -> InferenceClientBackend:
        return cls(server.model, key, url=url, concurrency=server.concurrency, announced=server.announced, **options)

    def __repr__(self) -> str:  # never show the key
        return f"InferenceClientBackend(where={self._where!r}, model={self.model_id!r})"

    @property
    def kind(self) -> str:
        return "tgi" if self.url else f"hf-inference-providers:{self.provider}"

    def describe(self) -> dict[str, str]:
        structured = "tgi grammar (json_object + value)" if self.url else "json_schema"
        return {"kind": self.kind, "model": model_label(self.model_id), "structured_output": structured}

    def observe(self, load: AttemptObserver) -> None:
        self._load = load

    async def size_pool(self, connections: int) -> None:
        """Let ``connections`` requests be in flight at once, spread over small pools (``http.pools``).

        huggingface_hub's client keeps one httpx pool of 100 connections: fewer than TGI's default 128
        slots, and one pool's cost grows with the square of its connections. Before the client's first
        request, its session is replaced by the same one (hub's request and response hooks) on a
        ``SpreadTransport``; with a proxy set in the environment (which a transport of our own would bypass)
        it keeps one pool, grown past 100 when needed. Where the client's internals differ, its own stays.
        """
        if getattr(self._client, "_async_client", "other") is not None:
            return
        try:
            import httpx2
            from huggingface_hub.utils._http import async_hf_request_event_hook, async_hf_response_event_hook
        except ImportError:
            return
        hooks = {"request": [async_hf_request_event_hook], "response": [async_hf_response_event_hook]}
        if not proxied():
            pools = {"transport": SpreadTransport.open(httpx2, connections)}
        elif connections > _HTTPX_DEFAULT_CONNECTIONS:
            pools = {"limits": httpx2.Limits(max_connections=connections, max_keepalive_connections=connections)}
        else:
            return
        session = httpx2.AsyncClient(event_hooks=hooks, follow_redirects=True, timeout=None, **pools)
        self._client._async_client = await self._client.exit_stack.enter_async_context(session)

    async def chat(self, messages: list[dict[str, str]], params: dict[str, Any]) -> ChatReply:
        try:
            async for attempt in retrying(self._attempts):
                with attempt:
                    output = await self._attempt(messages, params, attempt.retry_state.attempt_number == 1)
                    reply = read_answer(reply_from_chat_completion, output, "a chat completion")
        except Exception as exc:
            raise failure(self._where, exc, self._key, self._key_variable) from None
        return reply

    async def _attempt(self, messages: list[dict[str, str]], params: dict[str, Any], first: bool) -> Any:
        """One call, reported to the endpoint's limit: its status (from the error, when it failed) and time."""
        if self._load is not None:
            self._load.attempt(first)
        started = time.perf_counter()
        try:
            output = await self._client.chat_completion(messages=messages, model=self.model_id, **params)
        except Exception as exc:  # not a cancellation: that is no answer from the server, and not reported
            status = http_status(exc)  # None: no answer (a timeout, a dropped connection)
            # The client's own reading of a success body (its HTTP errors are ValueErrors too: they have a status)
            unreadable = status is None and isinstance(exc, ValueError | KeyError | TypeError)
            self._report(200 if unreadable else status, started)
            if unreadable:
                raise _unreadable(exc) from None
            raise
        self._report(200, started)
        return output

    def _report(self, status: int | None, started: float) -> None:
        if self._load is not None:
            self._load.answered(status, time.perf_counter() - started)

    async def aclose(self) -> None:
        close = getattr(self._client, "close", None)
        if close is not None:
            await close()


def provider_backend(provider: str, model: str | None, key: str | None, **options: Any) -> InferenceClientBackend:
    """HF Inference Providers: ``model`` is a Hub id (``org/name``); huggingface_hub routes it to ``provider``."""
    if not model:
        raise EndpointError(f"--provider {provider} needs the Hub model to run: --model org/name")
    return InferenceClientBackend(model, key, provider=provider, **options)


def _unreadable(exc: Exception) -> MalformedAnswerError:
    """huggingface_hub read the body and gave up: say what the body began with, where its error keeps it."""
    body = getattr(exc, "doc", None)  # json.JSONDecodeError keeps the text it could not read
    if isinstance(body, str):
        shown = " ".join(body.split())[:120]
        return MalformedAnswerError(f"answered with a body that is not JSON: {shown!r}")
    return MalformedAnswerError(f"answered with a body huggingface_hub cannot read ({type(exc).__name__}: {exc})")
