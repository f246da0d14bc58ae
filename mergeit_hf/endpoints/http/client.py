"""One httpx client per server for the routes mergeit calls itself (OpenAI-style chat, raw completions):
the bearer key, a pool as large as the concurrency, transient failures retried (``transport``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import httpx

from mergeit_hf.endpoints.base import AttemptObserver
from mergeit_hf.endpoints.http.pools import pool_limits, pool_sizes
from mergeit_hf.endpoints.http.transport import (
    failure,
    is_retryable_status,
    malformed,
    read_answer,
    retrying,
    server_message,
)

T = TypeVar("T")
_DEFAULT_CONNECTIONS = 100  # httpx's own default, until a session sizes the pool
#: However long the server keeps generating, no request waits more than this many request timeouts.
MOST_TIMEOUTS_WHILE_GENERATING = 10


@dataclass(frozen=True)
class Posted(Generic[T]):
    """A server's answer, and what ``read`` made of its JSON when the status was a success."""

    response: httpx.Response
    value: T | None = None


class JsonHttpClient:
    """POSTs JSON to ``url + path``; the key is held here only and never shown."""

    def __init__(self, url: str, key: str | None, *, timeout_s: float, attempts: int, key_variable: str) -> None:
        self.url = url
        self._key = key
        self._key_variable = key_variable
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._timeout_s = timeout_s
        self._attempts = attempts
        self._connections: int | None = None  # None: httpx's default pool, until ``size_pool`` sizes it
        self._pools: list[httpx.AsyncClient] = []  # opened by the first request, inside the running loop
        self._turn = 0
        self.load: AttemptObserver | None = None  # told of every attempt (``observe``), when the session sets one

    def __repr__(self) -> str:
        return f"JsonHttpClient(url={self.url!r})"

    @property
    def headers(self) -> dict[str, str]:
        """What every request carries (the key): for another client of the same server."""
        return dict(self._headers)

    def observe(self, load: AttemptObserver) -> None:
        """Report every attempt's status, latency and rate-limit headers to ``load`` (the endpoint's limit)."""
        self.load = load

    async def size_pool(self, connections: int) -> None:
        """Room for ``connections`` requests at once (httpx's default of 100 would cap it)."""
        await self.aclose()
        self._connections = connections

    def _client(self) -> httpx.AsyncClient:
        """The next of a few clients taken in turn, each with a small pool (``http.pools``: one large pool's
        cost grows with the square of its connections). Whole clients, not a ``SpreadTransport``, so that
        each honours the environment's proxy settings."""
        if not self._pools:
            context = httpx.create_ssl_context()  # one for all (each client would build its own)
            self._pools = [
                httpx.AsyncClient(
                    timeout=self._httpx_timeout(),
                    headers=self._headers,
                    verify=context,
                    limits=pool_limits(httpx, size),
                )
                for size in pool_sizes(self._connections or _DEFAULT_CONNECTIONS)
            ]
        self._turn = (self._turn + 1) % len(self._pools)
        return self._pools[self._turn]

    def _httpx_timeout(self) -> httpx.Timeout:
        """Without a load to say whether the server progresses, httpx times a request out; with one, the
        read waits up to the cap and ``_answer_while_generating`` decides (connecting is timed as before)."""
        if self.load is None:
            return httpx.Timeout(self._timeout_s)
        return httpx.Timeout(self._timeout_s, read=MOST_TIMEOUTS_WHILE_GENERATING * self._timeout_s)

    async def post(
        self,
        path: str,
        body: dict[str, Any],
        answered: Callable[[httpx.Response], bool] | None = None,
        read: Callable[[Any], T] | None = None,
    ) -> Posted[T]:
        """The first answer that is not transient; transient ones are retried until ``attempts`` are spent.

        answered: says of an answer with a retryable status that the caller reads it instead (llama-cpp-python's
            server refuses a response_format with a 500, which no retry can change).
        read: turns a successful answer's JSON into the caller's value. A success that is not JSON, is an
            error object, or lacks what ``read`` needs is malformed: retried like a 5xx, then the request
            fails saying what came back.
        """
        try:
            async for attempt in retrying(self._attempts):
                with attempt:
                    response = await self._timed_post(path, body, attempt.retry_state.attempt_number == 1)
                    if is_retryable_status(response.status_code) and not (answered and answered(response)):
                        response.raise_for_status()
                    value = _read(response, read) if read is not None and response.is_success else None
                    return Posted(response, value)
        except Exception as exc:
            raise self.error(path, exc) from None
        raise AssertionError("unreachable: the retry loop returns or raises")

    async def _timed_post(self, path: str, body: dict[str, Any], first: bool) -> httpx.Response:
        if self.load is None:
            return await self._client().post(self.url + path, json=body)
        self.load.attempt(first)
        started = time.perf_counter()
        try:
            response = await self._answer_while_generating(self._client().post(self.url + path, json=body))
        except httpx.TransportError:
            self.load.answered(None, time.perf_counter() - started)
            raise
        self.load.answered(response.status_code, time.perf_counter() - started, response.headers)
        return response

    async def _answer_while_generating(self, posting: Awaitable[httpx.Response]) -> httpx.Response:
        """The answer, waited for request_timeout_s past the later of the request's start and the server's
        last progress (``load.progressed_at``), never more than ``MOST_TIMEOUTS_WHILE_GENERATING`` timeouts.

        Why: a CPU or overloaded GPU server with many requests running answers each slowly; cutting one at
        the timeout throws its work away (vLLM aborts a request whose client went), and its retry starts
        from scratch on a server that is no less busy. A server that generates nothing for a whole timeout
        is stuck, and its requests time out as before."""
        started = time.monotonic()
        answer = asyncio.ensure_future(posting)
        kept = False
        try:
            while True:
                deadline = self._deadline(started)
                done, _ = await asyncio.wait({answer}, timeout=max(0.0, deadline - time.monotonic()))
                if done:
                    response = answer.result()
                    if kept and self.load is not None:  # counted once answered: a request kept, then cut, is not
                        self.load.count_kept_past_timeout()
                    return response
                if time.monotonic() >= self._deadline(started):
                    raise httpx.ReadTimeout(self._timed_out(started))
                kept = True
        finally:
            if answer.done():
                # Cancelled (a pair abandons a request) just as the answer failed: its error is read here, or
                # asyncio logs "Task exception was never retrieved".
                if not answer.cancelled():
                    answer.exception()
            else:
                answer.cancel()
                await asyncio.gather(answer, return_exceptions=True)  # its connection closed before we go on

    def _deadline(self, started: float) -> float:
        progressed = getattr(self.load, "progressed_at", None) or started
        latest = started + MOST_TIMEOUTS_WHILE_GENERATING * self._timeout_s
        return min(latest, max(started, progressed) + self._timeout_s)

    def _timed_out(self, started: float) -> str:
        waited = time.monotonic() - started
        if waited >= MOST_TIMEOUTS_WHILE_GENERATING * self._timeout_s:
            return (
                f"no answer in {waited:.0f} s ({MOST_TIMEOUTS_WHILE_GENERATING} × request_timeout_s, the most "
                "a request waits while the server generates)"
            )
        if waited < 1.5 * self._timeout_s:
            return f"no answer within request_timeout_s={self._timeout_s:g} s"
        return f"no answer in {waited:.0f} s, the last {self._timeout_s:g} s (request_timeout_s) with no progress"

    def check(self, path: str, response: httpx.Response) -> None:
        """Any error status raised as the endpoint's error, with what the server said."""
        try:
            response.raise_for_status()
        except httpx.HTTPStatusError as exc:
            raise self.error(path, exc) from None

    def error(self, path: str, exc: BaseException) -> Exception:
        return failure(self.url + path, exc, self._key, self._key_variable)

    async def aclose(self) -> None:
        pools, self._pools = self._pools, []
        for pool in pools:
            await pool.aclose()


def _read(response: httpx.Response, read: Callable[[Any], T]) -> T:
    try:
        answer = response.json()
    except ValueError:  # an HTML page from a proxy, JSON cut in half, an empty body
        raise malformed(response, "a body that is not JSON") from None
    if isinstance(answer, dict) and "error" in answer and not answer.get("choices"):
        raise malformed(response, f"an error object ({server_message(response)})")
    return read_answer(read, answer, "JSON", response)
