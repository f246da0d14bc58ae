"""Deita's expected quality score: the mean of the digits 1-6 weighted by their first-token probabilities."""

from __future__ import annotations

import math
from collections.abc import Iterable
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
