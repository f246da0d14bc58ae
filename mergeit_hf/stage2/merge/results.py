"""What stage 2 reports: each attempt, each pair's outcome, and the counts over a run."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from datasets import Dataset

from mergeit_hf.stage2.gate import AttemptScores

MergeStatus = Literal["accepted", "rejected", "failed", "skipped", "pending"]  # pending: a batch round only


@dataclass(frozen=True)
class MergeAttempt:
    """One merge the gate looked at (or the reason there was none to look at)."""

    seed: int
    merged: dict[str, str] | None = None
    scores: AttemptScores | None = None
    completed_at: str = ""
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        scores = self.scores
        return {
            "seed": self.seed,
            "error": self.error,
            "merged": self.merged,
            "quality_merged": scores.quality_merged if scores else None,
            "retentions": list(scores.retentions) if scores else None,
            "retention_parts": [list(pair) for pair in scores.parts] if scores else None,
            "lost": [list(items) for items in scores.lost] if scores else None,
            "judge": scores.judge if scores else None,
            "completed_at": self.completed_at,
        }


@dataclass(frozen=True)
class MergeOutcome:
    """What happened to one pair: the kept attempt, the gate's decision, and every attempt made."""

    status: MergeStatus
    reason: str
    merged: dict[str, str] | None = None
    quality_merged: float | None = None
    source_qualities: tuple[float | None, ...] = ()  # one per source, in group order (a, b, ...)
    source_complexities: tuple[float, ...] = ()  # with ``complexity_scores``: Deita complexity per source
    complexity_merged: float | None = None
    retentions: tuple[float, ...] | None = None  # each source's weaker part
    retention_parts: tuple[tuple[float, float], ...] = ()  # (question, answer) per source
    judge: float | None = None  # the judge's P(yes), with ``judge``
    rejection_cause: str | None = None
    attempts: int = 0  # merge requests sent (parse retries included)
    gate_attempts: tuple[MergeAttempt, ...] = ()
    scores_incomplete: int = 0
    completed_at: str = ""
    tokens: tuple[int, int] | None = None  # (prompt, completion) of every reply the pair used; None: unreported


@dataclass
class MergeStats:
    """What a ``merge_pairs`` call sent, which the outcomes cannot tell (their counts: ``OutcomeCounts``)."""

    requests_sent: int = 0  # requests actually sent; the rest came from the request cache
    idle_releases: int = 0  # answers that freed a slot no request was waiting for (``RequestScheduler``)


@dataclass(frozen=True)
class OutcomeCounts:
    """A run's outcomes counted once, the same way live, re-gated and read back from a folder."""

    statuses: dict[str, int]
    rejection_causes: dict[str, int]
    scores_incomplete: int  # quality scores computed with fewer than six digits among the top logprobs

    @classmethod
    def of_outcomes(cls, outcomes: Iterable[MergeOutcome]) -> OutcomeCounts:
        listed = list(outcomes)
        return cls.count(
            (o.status for o in listed), (o.rejection_cause for o in listed), (o.scores_incomplete for o in listed)
        )

    @classmethod
    def of_pairs(cls, pairs: Dataset) -> OutcomeCounts:
        """From the merged pairs' columns (``merge_status``, ``rejection_cause``, ``quality_scores_incomplete``)."""
        if len(pairs) == 0:
            return cls({}, {}, 0)
        incomplete = pairs["quality_scores_incomplete"] if "quality_scores_incomplete" in pairs.column_names else []
        return cls.count(pairs["merge_status"], pairs["rejection_cause"], incomplete)

    @classmethod
    def count(
        cls, statuses: Iterable[str], causes: Iterable[str | None], incomplete: Iterable[int | None]
    ) -> OutcomeCounts:
        return cls(dict(Counter(statuses)), dict(Counter(c for c in causes if c)), int(sum(n or 0 for n in incomplete)))

    def of(self, status: MergeStatus) -> int:
        return self.statuses.get(status, 0)

    def lines(self) -> dict[str, int]:
        """The run record's lines for the merges, every status named (zeros too)."""
        return {f"merges {status}": self.of(status) for status in ("accepted", "rejected", "failed", "skipped")}


@dataclass(frozen=True)
class MergeBatch:
    """The outcomes of one ``merge_pairs`` call (input order), their counts, and the models that made them."""

    outcomes: list[MergeOutcome]
    stats: MergeStats
    merge_model: str
    quality_model: str
    endpoints: dict[str, dict[str, str]] = field(default_factory=dict)  # ``Session.endpoints()``

    @property
    def counts(self) -> OutcomeCounts:
        return OutcomeCounts.of_outcomes(self.outcomes)
