"""The gate applied again to a run's stored scores over a grid of (α, min_retention): ``mergeit sweep`` and the
card's sweep figure, no LLM request.

Every scored pair keeps each gate attempt's quality and retentions in ``mergeit/pairs.parquet``
(``attempt_log``). A stricter setting cannot see merges that were never requested (a run with
``gate_retries`` stops retrying at the first accepted merge): those are the ones the sweep cannot count.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from datasets import Dataset

from mergeit_hf.errors import ConfigError
from mergeit_hf.stage2.gate import AttemptScores, best_attempt

DEFAULT_ALPHAS = (0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9)
DEFAULT_RETENTIONS = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7)
SCORED = ("accepted", "rejected")


@dataclass(frozen=True)
class ScoredPair:
    """What the gate needs of one pair: its sources' qualities and every attempt's scores."""

    qualities: tuple[float, ...]  # one per source: a, b, then a group's further sources
    attempts: tuple[AttemptScores, ...]


@dataclass(frozen=True)
class SweepTable:
    """Accepted pairs for every (α, min_retention) on a grid, from stored scores."""

    alphas: tuple[float, ...]
    retentions: tuple[float, ...]
    accepted: dict[tuple[float, float], int]
    n_scored: int
    current: tuple[float, float] | None = None

    def rate(self, alpha: float, min_retention: float) -> float:
        return self.accepted[(alpha, min_retention)] / self.n_scored if self.n_scored else 0.0

    def _cell(self, alpha: float, min_retention: float) -> str:
        mark = " ←" if self.current == (alpha, min_retention) else ""
        return f"{self.accepted[(alpha, min_retention)]} ({self.rate(alpha, min_retention):.0%}){mark}"

    def render(self) -> str:
        head = "| α | " + " | ".join(f"min_retention {r:.2f}" for r in self.retentions) + " |"
        lines = [head, "|---" * (len(self.retentions) + 1) + "|"]
        for alpha in self.alphas:
            cells = [self._cell(alpha, r) for r in self.retentions]
            lines.append(f"| {alpha:.2f} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def scored_pairs(pairs: Dataset) -> list[ScoredPair]:
    """The pairs the gate decided (accepted or rejected), with every attempt that was scored."""
    found = []
    more = pairs["quality_more"] if "quality_more" in pairs.column_names else [[]] * len(pairs)
    for status, qa, qb, rest, log in zip(
        pairs["merge_status"], pairs["quality_a"], pairs["quality_b"], more, pairs["attempt_log"], strict=True
    ):
        if status in SCORED:
            found.append(ScoredPair((qa, qb, *(rest or ())), attempt_scores(json.loads(log))))
    return found


def attempt_scores(log: list[dict[str, Any]]) -> tuple[AttemptScores, ...]:
    """The gate's view of each scored attempt of an ``attempt_log`` (logs from before retention parts or the
    judge have neither: their reasons name the source only, and no judge is read)."""
    return tuple(
        AttemptScores(
            a["quality_merged"],
            tuple(a["retentions"]),
            tuple(tuple(x) for x in a["lost"] or ()),
            tuple((q, ans) for q, ans in a.get("retention_parts") or ()),
            a.get("judge"),
        )
        for a in log
        if a.get("quality_merged") is not None
    )


def require_measured(pairs: Sequence[ScoredPair], min_judge: float | None, min_retention_given: bool) -> None:
    """Refuse, in one line, a threshold on something the run never measured (it would change nothing)."""
    attempts = [attempt for pair in pairs for attempt in pair.attempts]
    if min_judge is not None and not any(a.judge is not None for a in attempts):
        raise ConfigError(
            "this run has no judge verdicts (it was made without --judge): --min-judge has nothing to re-gate; "
            "run again with --judge, which re-sends only the judge's requests"
        )
    if min_retention_given and attempts and not any(a.retentions for a in attempts):
        raise ConfigError(
            "this run measured no retention (compute_retention: false): --min-retention has nothing to re-gate"
        )


def sweep(
    pairs: Sequence[ScoredPair],
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    retentions: Sequence[float] = DEFAULT_RETENTIONS,
    current: tuple[float, float] | None = None,
    min_judge: float | None = None,
) -> SweepTable:
    """Accepted pairs at every (α, min_retention), the judge's threshold (if any) held at ``min_judge``."""
    grid = [(alpha, r) for alpha in alphas for r in retentions]
    if current is not None and current not in grid:
        alphas, retentions = sorted({*alphas, current[0]}), sorted({*retentions, current[1]})
        grid = [(alpha, r) for alpha in alphas for r in retentions]
    accepted = {(alpha, r): sum(_accepted(pair, alpha, r, min_judge) for pair in pairs) for alpha, r in grid}
    return SweepTable(tuple(alphas), tuple(retentions), accepted, len(pairs), current)


def _accepted(pair: ScoredPair, alpha: float, min_retention: float, min_judge: float | None) -> bool:
    chosen = best_attempt(pair.attempts, pair.qualities, alpha, min_retention, min_judge)
    return chosen is not None and chosen[1].accepted
