"""HTTP behaviour every remote endpoint shares: which failures are transient, retries with backoff that
honour ``Retry-After``, errors that never show the token, the token itself, and the probe that reads what a
server says of itself before the first request."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Any

import httpx
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from mergeit_hf.endpoints.base import DEFAULT_CONCURRENCY
from mergeit_hf.errors import EndpointError

RETRYABLE_STATUS = frozenset({424, 429, 502, 503, 504})
_MAX_RETRY_AFTER_S = 120.0
_PROBE_CONNECT_TIMEOUT_S = 10.0


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


def token_from_environment() -> str | None:
    token = os.environ.get("HF_TOKEN")
    if token:
        return token
    from huggingface_hub import get_token

    return get_token()


# -- probe ---------------------------------------------------------------------------------------------


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
