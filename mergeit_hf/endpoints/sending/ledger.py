"""What a run sent, over all its sessions and endpoints: the sum of every ``EndpointLoad``'s counts."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from mergeit_hf.endpoints.sending.limit import EndpointLoad, counts_described


@dataclass
class RequestLedger:
    """What a run sent, over all its sessions and endpoints: attempts by role, retries, throttled answers and
    attempts left unanswered. The server's own log counts the same attempts."""

    sent: Counter = field(default_factory=Counter)
    retried: int = 0
    throttled: int = 0
    unanswered: int = 0  # no answer: a timeout or a dropped connection
    kept_past_timeout: int = 0  # answered after request_timeout_s, the server generating all the while

    def add(self, load: EndpointLoad) -> None:
        self.sent.update(load.sent)
        self.retried += sum(load.retried.values())
        self.throttled += load.throttled
        self.unanswered += load.timeouts
        self.kept_past_timeout += load.kept_past_timeout

    def merge(self, other: RequestLedger) -> None:
        """Add what another process (a Ray actor) sent."""
        self.sent.update(other.sent)
        self.retried += other.retried
        self.throttled += other.throttled
        self.unanswered += other.unanswered
        self.kept_past_timeout += other.kept_past_timeout

    def since(self, earlier: RequestLedger) -> RequestLedger:
        """What was sent after ``earlier`` (a snapshot of the same counts): a Ray actor reports it per batch."""
        return RequestLedger(
            self.sent - earlier.sent,
            self.retried - earlier.retried,
            self.throttled - earlier.throttled,
            self.unanswered - earlier.unanswered,
            self.kept_past_timeout - earlier.kept_past_timeout,
        )

    @property
    def total(self) -> int:
        return sum(self.sent.values())

    def described(self) -> dict[str, str]:
        """The counts as ``EndpointLoad.describe`` words them for the card and run.json."""
        return counts_described(self.sent, self.retried, self.throttled, self.unanswered, self.kept_past_timeout)

    def to_dict(self) -> dict[str, object]:
        return {
            "sent": self.total,
            "by_role": dict(sorted(self.sent.items())),
            "retried": self.retried,
            "throttled": self.throttled,
            "unanswered": self.unanswered,
            "kept_past_timeout": self.kept_past_timeout,
        }
