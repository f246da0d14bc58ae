"""Deita's quality and complexity score of every row, through the stage 2 scorer: what the prefilter ranks by.

The scorer is the scorer endpoint when set, else the merge model. Requests are cached like every stage 2
request, so a second run re-sends none. No default score: a row that cannot be scored stops the run.
"""

from __future__ import annotations

import asyncio

from datasets import Dataset
from tqdm.auto import tqdm

from mergeit_hf.endpoints.scheduler import run_sync
from mergeit_hf.errors import EndpointError, QualityScoringError
from mergeit_hf.prompts import PromptTemplate
from mergeit_hf.stage2.merger import Merger
from mergeit_hf.stage2.quality import QualityScore
from mergeit_hf.stage2.scoring import QualityScorer


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
