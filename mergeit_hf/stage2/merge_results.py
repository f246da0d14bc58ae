"""What stage 2 reports: each attempt, each pair's outcome, and the counts over a run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from mergeit_hf.stage2.gate import AttemptScores

MergeStatus = Literal["accepted", "rejected", "failed", "skipped"]


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
    """Counts over a run; ``acceptance_rate`` and ``incomplete_fraction`` explain it at a glance."""

    accepted: int = 0
    rejected: int = 0
    failed: int = 0
    scores: int = 0
    scores_incomplete: int = 0
    scores_unavailable: int = 0
    requests_sent: int = 0
    cache_hits: int = 0
    idle_releases: int = 0  # answers that freed a slot no request was waiting for (``RequestScheduler``)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    failure_reasons: dict[str, int] = field(default_factory=dict)
    rejection_causes: dict[str, int] = field(default_factory=dict)

    @property
    def pairs(self) -> int:
        return self.accepted + self.rejected + self.failed

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.pairs if self.pairs else 0.0

    @property
    def incomplete_fraction(self) -> float:
        return self.scores_incomplete / self.scores if self.scores else 0.0

    def add(self, outcome: MergeOutcome) -> None:
        setattr(self, outcome.status, getattr(self, outcome.status) + 1)
        if outcome.tokens:
            self.prompt_tokens += outcome.tokens[0]
            self.completion_tokens += outcome.tokens[1]
        if outcome.status == "failed":
            kind = outcome.reason.split(":")[0]
            self.failure_reasons[kind] = self.failure_reasons.get(kind, 0) + 1
        if outcome.rejection_cause:
            cause = outcome.rejection_cause
            self.rejection_causes[cause] = self.rejection_causes.get(cause, 0) + 1


@dataclass(frozen=True)
class MergeBatch:
    """The outcomes of one ``merge_pairs`` call (input order), their counts, and the models that made them."""

    outcomes: list[MergeOutcome]
    stats: MergeStats
    merge_model: str
    quality_model: str
    endpoints: dict[str, dict[str, str]] = field(default_factory=dict)  # ``Session.endpoints()``
