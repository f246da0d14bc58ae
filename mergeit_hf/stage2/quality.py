"""Deita's expected quality score and MergeIT's quality gate (paper, Eq. 9)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

SCORE_TOKENS = ("1", "2", "3", "4", "5", "6")


@dataclass(frozen=True)
class QualityScore:
    """Σ i·p(i) over the digit tokens 1..6 at the first generated position.

    ``value`` is None when no digit token is among the endpoint's top logprobs. Deita scores such
    cases 3.0 silently; here they are counted (``digits_found``) and the run stops above a threshold.
    """

    value: float | None
    digits_found: int

    @property
    def complete(self) -> bool:
        return self.digits_found == len(SCORE_TOKENS)

    @property
    def available(self) -> bool:
        return self.value is not None


def expected_score(top_logprobs: Iterable[tuple[str, float]]) -> QualityScore:
    """Softmax over the digits' log-probabilities, then the expectation of the digit.

    Tokens are compared after stripping whitespace, so " 4" and "4" both count as 4 (the best one).
    Missing digits have probability 0 in the softmax: the score is over the digits that were returned.
    """
    best: dict[str, float] = {}
    for token, logprob in top_logprobs:
        digit = token.strip()
        if digit in SCORE_TOKENS and logprob > best.get(digit, -math.inf):
            best[digit] = logprob
    if not best:
        return QualityScore(None, 0)
    peak = max(best.values())
    weights = {digit: math.exp(logprob - peak) for digit, logprob in best.items()}
    total = sum(weights.values())
    value = sum(int(digit) * weight for digit, weight in weights.items()) / total
    return QualityScore(value, len(best))


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
