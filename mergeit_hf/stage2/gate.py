"""The acceptance decision: the paper's quality gate (Eq. 9), the retention gate and the optional judge,
with their reasons.

One function decides live (stage 2) and afterwards (``mergeit regate`` / ``mergeit sweep``), from the
same stored numbers, so a re-gated folder is exactly what a run with those thresholds would have kept
from the merges it made.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from mergeit_hf.stage2.retention.measure import LOST_ITEMS_SHOWN

SIDES = ("a", "b", "c", "d", "e")  # a group's sources, in order
GateTest = Literal["quality", "retention", "judge"]


def gate_threshold(sources: Sequence[float], alpha: float) -> float:
    """α·(2/k)·Σ q(s_i) for k sources: the paper's α·(q(a)+q(b)) at k = 2, and for larger groups the same
    bar on the sources' mean (2α·mean), so a merge of five must beat its sources as a pair's must."""
    return alpha * (2 / len(sources)) * sum(sources)


def passes_gate(merged: float, sources: Sequence[float], alpha: float) -> bool:
    """Keep a merge only if q(merged) > α·(2/k)·Σ q(s_i) (Eq. 9 at k = 2)."""
    return merged > gate_threshold(sources, alpha)


def gate_explanation(merged: float, sources: Sequence[float], alpha: float) -> str:
    verdict = ">" if passes_gate(merged, sources, alpha) else "<="
    terms = "+".join(f"{q:.3f}" for q in sources)
    factor = f"{alpha}" if len(sources) == 2 else f"{alpha}·(2/{len(sources)})"
    return f"q(merged)={merged:.3f} {verdict} {factor}·({terms})={gate_threshold(sources, alpha):.3f}"


@dataclass(frozen=True)
class AttemptScores:
    """What the gate reads of one merge attempt."""

    quality_merged: float
    retentions: tuple[float, ...]  # one per source, in source order: its weaker part's retention
    lost: tuple[tuple[str, ...], ...] = ()  # the items each source's weaker part lost, heaviest first
    parts: tuple[tuple[float, float], ...] = ()  # (question, answer) per source; () in logs from before parts
    judge: float | None = None  # the judge's P(yes); None when no judge was asked

    @property
    def min_retention(self) -> float:
        return min(self.retentions)

    @property
    def weaker_parts(self) -> tuple[str, ...]:
        return tuple("answer" if answer <= question else "question" for question, answer in self.parts)


@dataclass(frozen=True)
class GateDecision:
    accepted: bool
    cause: str | None  # the failed tests, e.g. "retention" or "quality and judge"
    reason: str


def rejection_cause(failed: Sequence[GateTest]) -> str:
    """ "quality", "quality and retention", "quality, retention and judge"."""
    return failed[0] if len(failed) == 1 else ", ".join(failed[:-1]) + " and " + failed[-1]


def decide(
    attempt: AttemptScores,
    source_qualities: Sequence[float],
    alpha: float,
    min_retention: float,
    min_judge: float | None = None,
) -> GateDecision:
    """Accept only if q(merged) > α·(2/k)·Σ q(s_i) (Eq. 9: α·(q(a)+q(b)) for a pair), every source keeps
    at least ``min_retention`` in its weaker part, and, with ``min_judge``, the judge's P(yes) reaches it."""
    results: list[tuple[GateTest, bool, str]] = [
        (
            "quality",
            passes_gate(attempt.quality_merged, source_qualities, alpha),
            gate_explanation(attempt.quality_merged, source_qualities, alpha),
        ),
        ("retention", *_retention_test(attempt, min_retention)),
    ]
    if min_judge is not None:
        results.append(("judge", *_judge_test(attempt, min_judge)))
    failed = [test for test, ok, _ in results if not ok]
    # The failing tests first: a reader sees why without parsing the arithmetic of the passing ones.
    ordered = [reason for _, ok, reason in results if not ok] + [reason for _, ok, reason in results if ok]
    return GateDecision(not failed, rejection_cause(failed) if failed else None, "; ".join(ordered))


def _retention_test(attempt: AttemptScores, min_retention: float) -> tuple[bool, str]:
    if not attempt.retentions:  # compute_retention off: nothing measured, nothing gated
        return True, "retention not measured"
    weakest = min(range(len(attempt.retentions)), key=lambda i: attempt.retentions[i])
    value = attempt.retentions[weakest]
    if value >= min_retention:
        return True, f"retention {value:.2f} >= {min_retention:.2f}"
    side = SIDES[weakest]
    where = f"{attempt.weaker_parts[weakest]} of {side}" if attempt.weaker_parts else side
    lost = attempt.lost[weakest] if attempt.lost else ()
    shown = ", ".join(lost[:LOST_ITEMS_SHOWN]) or "no listed item"
    return False, f"retention: {where} {value:.2f} < {min_retention:.2f}; lost: {shown}"


def _judge_test(attempt: AttemptScores, min_judge: float) -> tuple[bool, str]:
    if attempt.judge is None:  # a run without the judge, re-gated with one: nothing to read
        return True, "judge not asked"
    if attempt.judge >= min_judge:
        return True, f"judge P(yes) {attempt.judge:.2f} >= {min_judge:.2f}"
    return (
        False,
        f"judge: P(yes) {attempt.judge:.2f} < {min_judge:.2f} (the merged answer misses or contradicts a part)",
    )


def best_attempt(
    attempts: Sequence[AttemptScores],
    source_qualities: Sequence[float],
    alpha: float,
    min_retention: float,
    min_judge: float | None = None,
) -> tuple[int, GateDecision] | None:
    """The first accepted attempt (retries stop there), else the one with the highest quality; None if empty."""
    if not attempts:
        return None
    return choose(attempts, [decide(a, source_qualities, alpha, min_retention, min_judge) for a in attempts])


def choose(attempts: Sequence[AttemptScores], decisions: Sequence[GateDecision]) -> tuple[int, GateDecision]:
    """Given each attempt's decision: the first accepted one, else the one with the highest quality."""
    for index, decision in enumerate(decisions):
        if decision.accepted:
            return index, decision
    index = max(
        range(len(attempts)), key=lambda i: (attempts[i].quality_merged, min(attempts[i].retentions, default=0))
    )
    return index, decisions[index]
