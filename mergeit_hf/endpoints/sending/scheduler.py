"""Sending LLM requests: a concurrency bound, the on-disk request cache, and identical requests sent once.

Every stage 2 request (merges, quality scores, the judge, the scorer check) goes through a
``RequestScheduler``: an answer comes from the cache, from an identical request already in flight, or from
the backend within the endpoint's limit (``sending.limit``: one per endpoint, shared by every scheduler
and role that sends to it); each answer is cached the moment it arrives, so a killed run re-sends nothing.
"""

from __future__ import annotations

import asyncio
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from mergeit_hf.endpoints.base import ChatBackend, ChatReply, CompletionBackend, TokenUsage
from mergeit_hf.endpoints.sending.collect import BatchCollector, BatchRequest
from mergeit_hf.endpoints.sending.limit import EndpointLoad, request_priority, request_role
from mergeit_hf.endpoints.sending.request_cache import RequestCache, payload_hash
from mergeit_hf.errors import EndpointConfigError
from mergeit_hf.prompts import PromptTemplate

#: A chat request (messages, through the server's chat template) or a raw prompt sent byte for byte.
Request = list[dict[str, str]] | str


#: Where the replies' tokens are counted: stage 2 sets one ``TokenUsage`` per pair, in the pair's own task
#: (a context variable follows each asyncio task), so a pair counts the replies it used, cached ones too.
current_usage: ContextVar[TokenUsage | None] = ContextVar("current_usage", default=None)


@dataclass
class RequestScheduler:
    """One backend, one cache, and the endpoint's limit on requests in flight (shared with every other
    scheduler of the same endpoint)."""

    backend: ChatBackend | CompletionBackend
    cache: RequestCache
    load: EndpointLoad
    requests_sent: int = 0
    #: Answers after which no request was waiting for the freed slot: the server then idles until the next
    #: one is ready. A stream keeps this near ``concurrency`` (the final drain); batches add it per batch.
    idle_releases: int = 0
    #: A batch round's collector (``--batch``): a request not in the cache is collected for the round's batch
    #: file and raises ``AnswerPending`` instead of being sent.
    collect: BatchCollector | None = None
    _waiting: int = field(default=0, init=False)
    _in_flight: dict[str, asyncio.Future] = field(default_factory=dict, init=False)

    @property
    def concurrency(self) -> int:
        """The endpoint's limit now (it moves when the server did not announce its size)."""
        return self.load.current

    async def complete(
        self, template: PromptTemplate, request: Request, params: dict[str, Any], role: str = "request"
    ) -> tuple[ChatReply, str]:
        """The reply and when it arrived (UTC, ISO seconds). ``role`` (merge, score, judge, ...) is what the
        request is counted as, and whose latencies it is compared with."""
        payload = {
            "model": self.backend.model_id,
            "template_sha256": template.sha256,
            "messages" if isinstance(request, list) else "prompt": request,
            "params": params,
        }
        key = payload_hash(payload)
        cached = self.cache.get(key)
        if cached is not None:
            reply, completed_at = ChatReply.from_dict(cached), cached["completed_at"]
        elif self.collect is not None:
            raise self.collect.missing(self._batch_request(key, payload, request, params, role))
        else:
            if key not in self._in_flight:  # identical payloads (e.g. two identical merges to score) are sent once
                sending = asyncio.ensure_future(self._send(key, payload, request, params, role))
                # Its waiters may all be gone (a pair stopped early): the error is then read here, not left
                # for asyncio to print as "Task exception was never retrieved".
                sending.add_done_callback(read_outcome)
                self._in_flight[key] = sending
            reply, completed_at = await asyncio.shield(self._in_flight[key])
        usage = current_usage.get()
        if usage is not None:
            usage.add(reply.usage)
        return reply, completed_at

    def _batch_request(
        self, key: str, payload: dict[str, Any], request: Request, params: dict[str, Any], role: str
    ) -> BatchRequest:
        batch_line = getattr(self.backend, "batch_line", None)
        if batch_line is None or not isinstance(request, list):
            raise EndpointConfigError(
                f"--batch needs an OpenAI-compatible chat endpoint; {role} requests go to "
                f"{self.backend.describe()['kind']}, which has no batch API here"
            )
        route, body = batch_line(request, params)
        return BatchRequest(key, payload, route, body, role)

    async def _send(
        self, key: str, payload: dict[str, Any], request: Request, params: dict[str, Any], role: str
    ) -> tuple[ChatReply, str]:
        request_role.set(role)  # this task's own context: the transport counts and times it as ``role``
        self._waiting += 1
        try:
            async with self.load.slot(request_priority.get()):
                self._waiting -= 1
                try:
                    if isinstance(request, list):
                        reply = await self.backend.chat(request, params)  # type: ignore[union-attr]
                    else:
                        reply = await self.backend.complete(request, params)  # type: ignore[union-attr]
                except EndpointConfigError as refused:
                    self.load.stop(refused)  # the run stops: send nothing more to this endpoint meanwhile
                    raise
                finally:
                    self.idle_releases += self._waiting == 0
        finally:
            self._in_flight.pop(key, None)
        self.requests_sent += 1
        completed_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.cache.put(key, payload, {**reply.to_dict(), "completed_at": completed_at})
        return reply, completed_at


def read_outcome(task: asyncio.Future) -> None:
    """A done callback that reads how a task ended, so an error nobody awaits is not printed by asyncio."""
    if not task.cancelled():
        task.exception()
