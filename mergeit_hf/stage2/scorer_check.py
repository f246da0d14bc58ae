"""Does the quality scorer see quality at all? Score real rows and corrupted variants it must rank lower.

Three corruptions of each row, each a worse answer to the same instruction:

swapped answer
    the output of another row of the sample (the next one, cyclically);
first sentence only
    the output cut to its first line, or to its first sentence when it is one line;
instruction as answer
    the instruction itself restated as the output.

A variant is ranked right when the original scores strictly higher (a tie is wrong: a gate cannot tell
the two apart). A variant identical to its original (a one-sentence answer) is not scored. Below
``min_accuracy`` the gate's decisions are noise, whatever α is.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mergeit_hf.endpoints.sending.sync import run_sync
from mergeit_hf.errors import EndpointError
from mergeit_hf.stage2.scoring.deita import QualityScore
from mergeit_hf.stage2.scoring.scorer import QualityScorer, ScoreCounts

if TYPE_CHECKING:
    from datasets import Dataset

    from mergeit_hf.stage2.merge.merger import Merger

Row = dict[str, str]
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _swapped(rows: Sequence[Row], index: int) -> str:
    return rows[(index + 1) % len(rows)]["output"]


def _first_sentence(rows: Sequence[Row], index: int) -> str:
    output = rows[index]["output"].strip()
    first_line = output.split("\n", 1)[0].strip()
    return first_line if first_line != output else _SENTENCE_END.split(output, 1)[0]


def _instruction(rows: Sequence[Row], index: int) -> str:
    return rows[index]["instruction"]


CORRUPTIONS: dict[str, Callable[[Sequence[Row], int], str]] = {
    "swapped answer": _swapped,
    "first sentence only": _first_sentence,
    "instruction as answer": _instruction,
}


@dataclass(frozen=True)
class CorruptionAccuracy:
    name: str
    right: int
    scored: int

    @property
    def accuracy(self) -> float:
        return self.right / self.scored if self.scored else 0.0


@dataclass(frozen=True)
class ScorerCheck:
    """Accuracy of the scorer at ranking originals above their corruptions."""

    model_id: str
    n_rows: int
    per_corruption: tuple[CorruptionAccuracy, ...]
    min_accuracy: float
    unavailable: int = 0  # scores with no digit 1-6 at all (counted as wrong)
    failed: int = 0  # score requests that failed (a bad answer after retries; counted as wrong)
    total_scores: int = 0  # score requests made (originals and variants)

    @property
    def no_digits(self) -> bool:
        """Not one score had a digit: the model is not scoring at all (not merely badly)."""
        return self.unavailable > 0 and self.unavailable + self.failed >= self.total_scores

    @property
    def right(self) -> int:
        return sum(c.right for c in self.per_corruption)

    @property
    def scored(self) -> int:
        return sum(c.scored for c in self.per_corruption)

    @property
    def accuracy(self) -> float:
        return self.right / self.scored if self.scored else 0.0

    @property
    def passed(self) -> bool:
        return self.scored > 0 and self.accuracy >= self.min_accuracy

    def report(self) -> str:
        lines = [f"scorer: {self.model_id}"]
        lines += [f"  {c.name:<22} {c.right:>3}/{c.scored:<3} {c.accuracy:.2f}" for c in self.per_corruption]
        if self.unavailable:
            lines.append(f"  {self.unavailable} score(s) had no digit 1-6 among the top logprobs (counted as wrong)")
        if self.failed:
            lines.append(f"  {self.failed} score request(s) failed after retries (counted as wrong)")
        if not self.passed:
            lines.append(
                f"WARNING: accuracy {self.accuracy:.2f} < {self.min_accuracy}: this scorer barely ranks real answers "
                "above broken ones, so the quality gate's decisions would be noise. Use a stronger scorer "
                "(the Deita scorer, or a >= 1.5B instruct model)."
            )
        lines.append(f"scorer accuracy: {self.accuracy:.2f} (n={self.n_rows})")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model_id,
            "rows": self.n_rows,
            "accuracy": round(self.accuracy, 4),
            "min_accuracy": self.min_accuracy,
            "passed": self.passed,
            "unavailable": self.unavailable,
            "failed": self.failed,
            "per_corruption": {c.name: {"right": c.right, "scored": c.scored} for c in self.per_corruption},
        }


def sample_rows(rows: Sequence[Row] | Dataset, n_rows: int, seed: int) -> list[Row]:
    """``n_rows`` rows drawn without replacement, reproducibly; all of them when there are fewer (from a
    Dataset, only those rows are read)."""
    indices = sorted(random.Random(seed).sample(range(len(rows)), min(n_rows, len(rows))))
    return [{k: rows[i].get(k) or "" for k in ("instruction", "input", "output")} for i in indices]


async def check_scorer(
    rows: Sequence[Row], scorer: QualityScorer, model_id: str, min_accuracy: float = 0.7
) -> ScorerCheck:
    """Score every row and its variants concurrently (through the scorer's cache) and count the rankings."""
    if len(rows) < 2:
        raise ValueError(f"the scorer check needs at least 2 rows, got {len(rows)}")
    # The check measures the scorer, missing digits included (counted as wrong): it never stops on them,
    # and its scores stay out of the run's missing-digit accounting. The requests are the same either way.
    lenient = dataclasses.replace(scorer.config, max_missing_score_fraction=1.0)
    scorer = dataclasses.replace(scorer, config=lenient, counts=ScoreCounts(), role="scorer check")
    variants = [
        (name, index, {**rows[index], "output": text})
        for name, corrupt in CORRUPTIONS.items()
        for index in range(len(rows))
        if (text := corrupt(rows, index)).strip() and text.strip() != rows[index]["output"].strip()
    ]
    scores = await asyncio.gather(*(scorer.score(row) for row in [*rows, *(v[2] for v in variants)]))
    failed = [score for score in scores if isinstance(score, EndpointError)]
    if len(failed) * 2 > len(scores):
        raise failed[0]  # the scorer is not answering: merging could not score either
    originals, corrupted = scores[: len(rows)], scores[len(rows) :]
    tallies = {name: [0, 0] for name in CORRUPTIONS}
    for (name, index, _), score in zip(variants, corrupted, strict=True):
        tallies[name][1] += 1
        tallies[name][0] += _ranked_right(originals[index], score)
    unavailable = sum(not s.available for s in scores if isinstance(s, QualityScore))
    per = tuple(CorruptionAccuracy(name, right, scored) for name, (right, scored) in tallies.items())
    return ScorerCheck(model_id, len(rows), per, min_accuracy, unavailable, len(failed), len(scores))


def _ranked_right(original: Any, corrupted: Any) -> bool:
    if isinstance(original, EndpointError) or isinstance(corrupted, EndpointError):
        return False
    if not (original.available and corrupted.available):
        return False
    return original.value > corrupted.value


def run_scorer_check(rows: Sequence[Row] | Dataset, merger: Merger, n_rows: int | None = None) -> ScorerCheck:
    """The check through ``merger``'s backend, cache and quality template (what its gate will use)."""
    config = merger.config
    sample = sample_rows(rows, n_rows or config.scorer_check_rows, config.seed)

    async def check() -> ScorerCheck:
        async with merger.session(merging=False) as session:
            return await check_scorer(sample, session.scorer, session.quality_model, config.scorer_check_min_accuracy)

    return run_sync(check())
