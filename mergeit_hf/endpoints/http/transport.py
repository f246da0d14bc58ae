"""HTTP behaviour every remote endpoint shares, as the providers' SDKs (OpenAI's, Anthropic's) do it.

Retried: 408, 409, 429 and every 5xx (and TGI's 424), timeouts and dropped connections, with exponential backoff and
jitter, waiting longer where the server asks (``Retry-After`` in seconds or as an HTTP date,
``retry-after-ms``, ``x-ratelimit-reset-*``). Not retried: every other 4xx. 401, 403 and 404 say the
configuration is wrong (key, model or URL): they stop the run once instead of failing every pair. Every
error carries what the server said and never the key.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from mergeit_hf.errors import EndpointConfigError, EndpointError, MalformedAnswerError

#: Statuses below 500 worth another try: timeout, conflict, rate limit, and TGI's 424 (a generation that
#: failed in a shard, as a 5xx would).
RETRYABLE_CLIENT_STATUS = frozenset({408, 409, 424, 429})
#: Statuses that no retry and no other pair can fix: the key, the model name or the URL is wrong.
CONFIGURATION_STATUS = frozenset({401, 403, 404})
_MAX_SERVER_WAIT_S = 120.0
_MESSAGE_CHARS = 300
_BODY_CHARS = 120  # of a malformed answer, in the reason a request fails with
T = TypeVar("T")

#: Connection-level failures, by class name, because the client's HTTP stack differs between
#: huggingface_hub releases (httpx2 in 2.x, httpx in 1.x, aiohttp before) and our own httpx: dropped or
#: refused connections, protocol errors mid-answer, and timeouts.
_TRANSPORT_ERROR_NAMES = frozenset(
    {
        "TransportError",
        "TimeoutException",
        "ClientConnectionError",
        "ClientPayloadError",
        "ServerDisconnectedError",
    }
)


def is_retryable_status(status: int) -> bool:
    return status in RETRYABLE_CLIENT_STATUS or status >= 500


def http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def server_message(response: Any) -> str:
    """What the server said, from the error shapes in use: OpenAI's ``{"error": {"message"}}``, vLLM's and
    SGLang's ``{"message"}``, TGI's ``{"error"}``, FastAPI's ``{"detail"}``; else the body's text."""
    try:
        body = response.json()
    except Exception:
        body = None
    return body_message(body) or body_message(getattr(response, "text", "") or "")


def body_message(body: Any) -> str:
    """``server_message`` of an answer's parsed body (a batch file's line carries the body, not a response)."""
    found: Any = body if isinstance(body, str) else None
    if isinstance(body, dict):
        error = body.get("error")
        found = error.get("message") if isinstance(error, dict) else error
        found = found or body.get("message") or body.get("detail")
    if found is None:
        return ""
    text = found if isinstance(found, str) else str(found)
    return " ".join(text.split())[:_MESSAGE_CHARS]


def malformed(response: Any, problem: str) -> MalformedAnswerError:
    """What came back, for the reason a request fails with: status, content type and the body's first
    characters (the caller redacts the key from the message)."""
    status = getattr(response, "status_code", "?")
    headers = getattr(response, "headers", {}) or {}
    kind = headers.get("content-type", "no content type")
    body = " ".join((getattr(response, "text", "") or "").split())[:_BODY_CHARS]
    return MalformedAnswerError(f"answered HTTP {status} ({kind}) with {problem}: {body!r}")


def read_answer(read: Callable[[Any], T], answer: Any, what: str, response: Any = None) -> T:
    """``read(answer)``, or the answer named as malformed: a field the dialect promises missing, of the wrong
    type, or empty; never a ``KeyError`` out of one request into the run. With the HTTP ``response``, the
    reason gives its status and content type too."""
    try:
        return read(answer)
    except MalformedAnswerError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        problem = f"{what} that lacks {_missing(exc)}"
        if response is not None:
            raise malformed(response, problem) from None
        shown = " ".join(str(answer).split())[:_BODY_CHARS]
        raise MalformedAnswerError(f"answered with {problem}: {shown!r}") from None


def _missing(exc: BaseException) -> str:
    if isinstance(exc, KeyError):
        return f"the field {exc.args[0]!r}" if exc.args else "a field"
    if isinstance(exc, IndexError):
        return "an entry (an empty list)"
    return f"the expected shape ({type(exc).__name__}: {exc})"


def retry_after_seconds(exc: BaseException) -> float | None:
    """How long the server asked us to wait, capped; None where it did not say."""
    response = getattr(exc, "response", None)
    headers: Mapping[str, str] = getattr(response, "headers", None) or {}
    waits = [_retry_after(headers)]
    for kind in ("requests", "tokens"):
        # Only the limit that ran out matters; a header without its `remaining` twin counts too.
        if headers.get(f"x-ratelimit-remaining-{kind}", "0") == "0":
            waits.append(_duration_seconds(headers.get(f"x-ratelimit-reset-{kind}")))
    known = [wait for wait in waits if wait is not None]
    return min(max(max(known), 0.0), _MAX_SERVER_WAIT_S) if known else None


def _retry_after(headers: Mapping[str, str]) -> float | None:
    milliseconds = headers.get("retry-after-ms")
    if milliseconds is not None:
        try:
            return float(milliseconds) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return (when - datetime.now(timezone.utc)).total_seconds()


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def _duration_seconds(text: str | None) -> float | None:
    """OpenAI's reset durations: "1s", "6m0s", "59.5ms", "1h2m3s"; a bare number is seconds."""
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    parts = _DURATION_PART.findall(text)
    return sum(float(value) * _UNIT_SECONDS[unit] for value, unit in parts) if parts else None


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, MalformedAnswerError):
        return True  # gateways and proxies answer so under load: another try usually gets a real answer
    status = http_status(exc)
    if status is not None:
        return is_retryable_status(status)
    if isinstance(exc, asyncio.TimeoutError | TimeoutError | ConnectionError):
        return True
    return any(cls.__name__ in _TRANSPORT_ERROR_NAMES for cls in type(exc).__mro__)


class _WaitHonouringServer:
    """Exponential backoff with jitter, or the server's own wait when it asks for longer."""

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
    """Transient failures retried with backoff (or the server's wait), the last error re-raised."""
    return AsyncRetrying(
        retry=retry_if_exception(is_transient),
        stop=stop_after_attempt(attempts),
        wait=_WaitHonouringServer(),
        reraise=True,
    )


def failure(url: str, exc: BaseException, key: str | None, key_variable: str = "MERGEIT_API_KEY") -> EndpointError:
    """The error a caller sees: the URL, the status and what the server said, never the key.

    401/403/404 come back as ``EndpointConfigError``, which stops the run (raise it) instead of failing a pair.
    """
    if isinstance(exc, MalformedAnswerError):
        return MalformedAnswerError(f"{url} {redact(str(exc), key)} (after retries)")
    status = http_status(exc)
    if status is None:
        detail = redact(str(exc), key)[:_MESSAGE_CHARS] or "no detail"
        return EndpointError(f"{url} failed ({type(exc).__name__}: {detail}) after retries")
    said = redact(server_message(exc.response), key)  # type: ignore[attr-defined]
    if status in CONFIGURATION_STATUS:
        return configuration_error(url, status, said, key_variable)
    setting = refused_setting(said) if status in (400, 422) else None
    if setting:  # every request carries it: stop at the first refusal instead of failing every pair in flight
        return EndpointConfigError(f"{url} answered HTTP {status}: {said}; {setting}")
    when = "after retries" if is_retryable_status(status) else "(not retried: the same request would fail again)"
    return EndpointError(f"{url} answered HTTP {status} {when}: {said or 'no message'}")


#: A 400 about one request (its prompt too long for the context): not a setting every request shares.
_ONE_REQUEST = re.compile(r"context length|maximum context|too long|input tokens|prompt is too", re.IGNORECASE)
_UNKNOWN_PARAMETER = re.compile(
    r"unrecognized request argument|unknown (?:parameter|field|argument)|extra (?:inputs|fields) are not permitted|"
    r"unexpected keyword",
    re.IGNORECASE,
)


def refused_setting(said: str) -> str | None:
    """The setting to change when a server refuses something every request carries (vLLM's cap on logprobs,
    a parameter it does not know); None when the refusal is about one request."""
    if not said or _ONE_REQUEST.search(said):
        return None
    if "logprob" in said.lower():
        return (
            "every score asks for top_logprobs: lower top_logprobs in the config to what the server allows "
            "(vLLM: or start it with a higher --max-logprobs)"
        )
    if _UNKNOWN_PARAMETER.search(said):
        return "the server does not take a parameter every request carries: see its message, and the config"
    return None


def configuration_error(url: str, status: int, said: str, key_variable: str) -> EndpointConfigError:
    if status in (401, 403):
        advice = f"set {key_variable} (or HF_TOKEN) to a key this server accepts"
    else:
        advice = "check the model name (--model / MERGEIT_MODEL) and the URL"
    return EndpointConfigError(f"{url} answered HTTP {status}: {said or 'no message'}; {advice}")


def api_key(variable: str) -> str | None:
    """The key for one endpoint: its own variable (``MERGEIT_API_KEY``, ``MERGEIT_SCORER_API_KEY``), else
    ``HF_TOKEN``, else the saved Hugging Face login. Read when requests are sent; never stored in config."""
    key = os.environ.get(variable) or os.environ.get("HF_TOKEN")
    if key:
        return key
    from huggingface_hub import get_token

    return get_token()


def base_url(url: str) -> str:
    """The server's root as users copy it, with or without a trailing ``/v1`` (OpenAI, vLLM and SGLang
    docs give ``…/v1``); routes are added to the root."""
    root = url.strip().rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root
