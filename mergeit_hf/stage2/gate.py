"""The acceptance decision: the paper's quality gate (Eq. 9) and the retention gate, with their reasons.

One function decides live (stage 2) and afterwards (``mergeit regate`` / ``mergeit sweep``), from the
same stored numbers, so a re-gated folder is exactly what a run with those thresholds would have kept
from the merges it made.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from mergeit_hf.stage2.quality import gate_explanation, passes_gate
from mergeit_hf.stage2.retention import LOST_ITEMS_SHOWN

SIDES = ("a", "b", "c", "d", "e")  # a group's sources, in order
RejectionCause = Literal["quality", "retention", "quality and retention"]


@dataclass(frozen=True)
class AttemptScores:
    """What the gate reads of one merge attempt."""

    quality_merged: float
    retentions: tuple[float, ...]  # one per source, in source order
    lost: tuple[tuple[str, ...], ...] = ()  # the salient items each source lost, heaviest first

    @property
    def min_retention(self) -> float:
        return min(self.retentions)


@dataclass(frozen=True)
class GateDecision:
    accepted: bool
    cause: RejectionCause | None
    reason: str


def decide(
    attempt: AttemptScores, source_qualities: Sequence[float], alpha: float, min_retention: float
) -> GateDecision:
    """Accept only if q(merged) > α·(2/k)·Σ q(s_i) (Eq. 9: α·(q(a)+q(b)) for a pair) and every source
    keeps at least ``min_retention``."""
    quality_ok = passes_gate(attempt.quality_merged, source_qualities, alpha)
    reasons = [gate_explanation(attempt.quality_merged, source_qualities, alpha)]
    if not attempt.retentions:  # compute_retention off: nothing measured, nothing gated
        reasons.append("retention not measured")
        quality_cause: RejectionCause = "quality"
        return GateDecision(quality_ok, None if quality_ok else quality_cause, "; ".join(reasons))
    weakest = min(range(len(attempt.retentions)), key=lambda i: attempt.retentions[i])
    retention_ok = attempt.retentions[weakest] >= min_retention
    if not retention_ok:
        side = SIDES[weakest]
        lost = attempt.lost[weakest] if attempt.lost else ()
        shown = ", ".join(lost[:LOST_ITEMS_SHOWN]) or "no listed item"
        reasons.append(
            f"retention: {side} {attempt.retentions[weakest]:.2f} < {min_retention:.2f}; lost from {side}: {shown}"
        )
    else:
        reasons.append(f"retention {attempt.min_retention:.2f} >= {min_retention:.2f}")
    if quality_ok and retention_ok:
        return GateDecision(True, None, "; ".join(reasons))
    cause: RejectionCause = (
        "quality and retention" if not (quality_ok or retention_ok) else "quality" if not quality_ok else "retention"
    )
    # The failing test first: a reader sees why without parsing the arithmetic of the passing one.
    ordered = reasons if not quality_ok else reasons[::-1]
    return GateDecision(False, cause, "; ".join(ordered))


def best_attempt(
    attempts: Sequence[AttemptScores], source_qualities: Sequence[float], alpha: float, min_retention: float
) -> tuple[int, GateDecision] | None:
    """The first accepted attempt (retries stop there), else the one with the highest quality; None if empty."""
    if not attempts:
        return None
    return choose(attempts, [decide(a, source_qualities, alpha, min_retention) for a in attempts])


def choose(attempts: Sequence[AttemptScores], decisions: Sequence[GateDecision]) -> tuple[int, GateDecision]:
    """Given each attempt's decision: the first accepted one, else the one with the highest quality."""
    for index, decision in enumerate(decisions):
        if decision.accepted:
            return index, decision
    index = max(
        range(len(attempts)), key=lambda i: (attempts[i].quality_merged, min(attempts[i].retentions, default=0))
    )
    return index, decisions[index]
