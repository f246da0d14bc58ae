"""What one batch round collects: every request whose answer is not cached, as the JSON line the batch file
carries (``custom_id`` = the request cache key), and the lines that failed too often to send again."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from mergeit_hf.errors import AnswerPending, EndpointError


@dataclass(frozen=True)
class BatchRequest:
    """One collected request: its cache key and payload (what the cache stores), and the batch line."""

    key: str
    payload: dict[str, Any]
    route: str  # the chat route the line names, e.g. /v1/chat/completions
    body: dict[str, Any]
    role: str

    def line(self) -> bytes:
        line = {"custom_id": self.key, "method": "POST", "url": self.route, "body": self.body}
        return (json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


@dataclass
class BatchCollector:
    """Filled by the request schedulers during a round (``RequestScheduler.collect``).

    given_up: keys whose lines failed ``request_retries`` times, with the last reason: their request now fails
        (its pair fails with that reason, as a request failing after its retries does in a synchronous run).
    structured_output: the response_format form the lines are written in (the provider refused the ones above
        it in earlier rounds: ``endpoints.structured_output``); None leaves the server's own first form.
    """

    given_up: dict[str, str] = field(default_factory=dict)
    structured_output: str | None = None
    requests: dict[str, BatchRequest] = field(default_factory=dict)

    def missing(self, request: BatchRequest) -> Exception:
        """What the scheduler raises for an uncached request: pending (collected), or the lines' failure."""
        reason = self.given_up.get(request.key)
        if reason is not None:
            return EndpointError(f"batch request failed: {reason}")
        self.requests.setdefault(request.key, request)
        return AnswerPending(request.key)

    def by_role(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for request in self.requests.values():
            counts[request.role] = counts.get(request.role, 0) + 1
        return counts
