"""What a run sent, over all its sessions and endpoints: the sum of every ``EndpointLoad``'s counts."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from mergeit_hf.endpoints.sending.limit import EndpointLoad


@dataclass
class RequestLedger:
    """What a run sent, over all its sessions and endpoints: attempts by role, retries, throttled answers.
    The server's own log counts the same attempts."""

    sent: Counter = field(default_factory=Counter)
    retried: int = 0
    throttled: int = 0

    def add(self, load: EndpointLoad) -> None:
        self.sent.update(load.sent)
        self.retried += sum(load.retried.values())
        self.throttled += load.throttled

    def merge(self, other: RequestLedger) -> None:
        """Add what another process (a Ray actor) sent."""
        self.sent.update(other.sent)
        self.retried += other.retried
        self.throttled += other.throttled

    @property
    def total(self) -> int:
        return sum(self.sent.values())

    def to_dict(self) -> dict[str, object]:
        return {
            "sent": self.total,
            "by_role": dict(sorted(self.sent.items())),
            "retried": self.retried,
            "throttled": self.throttled,
        }

    def summary(self) -> str:
        by_role = ", ".join(f"{role} {n}" for role, n in sorted(self.sent.items()))
        return f"{self.total} ({by_role}); {self.retried} retried, {self.throttled} throttled (429/503)"
