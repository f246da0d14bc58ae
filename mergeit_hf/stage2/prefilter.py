"""Optional stage 0, as the authors' scripts do: keep the rows Deita rates best before clustering.

Every valid row has Deita's quality score (instruction + input, output) and complexity score
(instruction + input), from the stage 2 scorer (the scorer endpoint when set, else the merge model; cached
like every stage 2 request, so a second run re-sends none), and only the ``prefilter_top`` rows
with the highest quality × complexity go on to stage 1 (the authors kept 35k of Alpaca's 52k). Every other
row is accounted for as ``prefiltered``, with its product and the cutoff. No default score: a row that
cannot be scored stops the run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from datasets import Dataset
from tqdm.auto import tqdm

from mergeit_hf.endpoints.sending.sync import run_sync
from mergeit_hf.errors import EndpointError, QualityScoringError
from mergeit_hf.inputs.loading import DroppedRow
from mergeit_hf.prompts import PromptTemplate
from mergeit_hf.stage2.merge.merger import Merger
from mergeit_hf.stage2.scoring.deita import QualityScore
from mergeit_hf.stage2.scoring.scorer import QualityScorer

PREFILTER_REASON = "prefilter"


@dataclass
class PrefilterResult:
    """The rows kept (with ``quality`` and ``complexity`` columns) and the rows left out, with why."""

    kept: Dataset
    dropped: list[DroppedRow]
    cutoff: float  # the smallest quality × complexity kept
    requests_sent: int

    @property
    def n_dropped(self) -> int:
        return len(self.dropped)

    def summary(self) -> str:
        return (
            f"prefilter: kept {len(self.kept)} rows with quality × complexity >= {self.cutoff:.2f}, "
            f"left out {self.n_dropped}"
        )


def prefilter_rows(rows: Dataset, merger: Merger, top: int | float) -> PrefilterResult:
    """Score every row's quality and complexity with the stage 2 scorer, then keep the ``top`` by their product."""
    quality, complexity, sent = score_rows(rows, merger)
    return prefilter(rows, quality, complexity, top, sent)


def prefilter_count(top: int | float, n_rows: int) -> int:
    """How many rows a ``prefilter_top`` keeps: a count, or a fraction of the valid rows."""
    wanted = top if isinstance(top, int) else round(top * n_rows)
    return max(1, min(int(wanted), n_rows))


def prefilter(
    rows: Dataset, quality: Sequence[float], complexity: Sequence[float], top: int | float, requests_sent: int = 0
) -> PrefilterResult:
    """Keep the ``top`` rows by quality × complexity (ties: input order); ``requests_sent`` is what scoring cost."""
    product = np.asarray(quality) * np.asarray(complexity)
    keep_n = prefilter_count(top, len(rows))
    order = np.argsort(-product, kind="stable")
    kept = np.sort(order[:keep_n])
    cutoff = float(product[order[keep_n - 1]])
    scored = rows.add_column("quality", list(quality)).add_column("complexity", list(complexity))
    left_out = np.sort(order[keep_n:])
    dropped = [
        DroppedRow(
            int(rows[int(i)]["source_index"]),
            PREFILTER_REASON,
            f"quality {quality[i]:.2f} × complexity {complexity[i]:.2f} = {product[i]:.2f} below the cutoff "
            f"{cutoff:.2f} (the top {keep_n} of {len(rows)} rows were kept)",
            rows[int(i)]["id"],
        )
        for i in left_out
    ]
    return PrefilterResult(scored.select(kept), dropped, cutoff, requests_sent)


def score_rows(rows: Dataset, merger: Merger) -> tuple[list[float], list[float], int]:
    """Every row's quality and complexity, and how many requests were sent (the rest came from the cache)."""
    return run_sync(_score_all(rows, merger))


async def _score_all(rows: Dataset, merger: Merger) -> tuple[list[float], list[float], int]:
    config = merger.config
    complexity_template = PromptTemplate.load(config.complexity_template)
    texts = rows.select_columns(["instruction", "input", "output"]).to_list()
    async with merger.session(merging=False) as session:
        complexity = session.scorer.with_template(complexity_template)
        # disable=None: a bar on a terminal, none in logs (52k rows are 104k scores: worth watching).
        progress = tqdm(total=2 * len(texts), desc="Prefilter scores", unit="score", disable=None)

        async def one(scorer: QualityScorer, row: dict[str, str], index: int, name: str) -> float:
            score = await scorer.score(row)
            progress.update(1)
            return _value(score, index, name)

        values = await asyncio.gather(
            *(one(session.scorer, row, i, "quality") for i, row in enumerate(texts)),
            *(one(complexity, row, i, "complexity") for i, row in enumerate(texts)),
        )
        progress.close()
        return list(values[: len(texts)]), list(values[len(texts) :]), session.requests_sent


def _value(score: QualityScore | EndpointError, index: int, name: str) -> float:
    # No default score: a row the prefilter cannot rank stops the run, naming the row and the cause.
    if isinstance(score, EndpointError):
        raise EndpointError(f"prefilter: scoring the {name} of row {index}: {score}")
    if score.value is None:
        raise QualityScoringError(
            f"prefilter: the {name} score of row {index} has no digit 1-6 among the top logprobs; "
            "use a Deita scorer (--scorer-endpoint) or raise top_logprobs"
        )
    return score.value
