"""Optional stage 0, as the authors' scripts do: keep the rows Deita rates best before clustering.

Every valid row has Deita's quality score (instruction + input, output) and complexity score
(instruction + input), from the stage 2 scorer (the scorer endpoint when set, else the merge model; cached
like every stage 2 request, so a second run re-sends none), and only the ``prefilter_top`` rows
with the highest quality × complexity go on to stage 1 (the authors kept 35k of Alpaca's 52k). Every other
row is accounted for as ``prefiltered``, with its product and the cutoff. No default score: a row that
cannot be scored stops the run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from datasets import Dataset
from tqdm.auto import tqdm

from mergeit_hf.endpoints.sending.sync import run_sync
from mergeit_hf.endpoints.sending.window import map_windowed
from mergeit_hf.errors import EndpointError, QualityScoringError
from mergeit_hf.inputs.loading import DroppedRow
from mergeit_hf.prompts import PromptTemplate
from mergeit_hf.stage2.merge.merger import WINDOW_PER_SLOT, Merger
from mergeit_hf.stage2.scoring.deita import QualityScore

PREFILTER_REASON = "prefilter"
UNSCORED_REASON = "prefilter: not scored"


@dataclass
class PrefilterResult:
    """The rows kept (with ``quality`` and ``complexity`` columns) and the rows left out, with why."""

    kept: Dataset
    dropped: list[DroppedRow]
    cutoff: float  # the smallest quality × complexity kept
    requests_sent: int
    n_unscored: int = 0  # rows left out because their score request failed

    @property
    def n_dropped(self) -> int:
        return len(self.dropped)

    def summary(self) -> str:
        return (
            f"prefilter: kept {len(self.kept)} rows with quality × complexity >= {self.cutoff:.2f}, "
            f"left out {self.n_dropped}" + (f" ({self.n_unscored} could not be scored)" if self.n_unscored else "")
        )


def prefilter_rows(rows: Dataset, merger: Merger, top: int | float) -> PrefilterResult:
    """Score every row's quality and complexity with the stage 2 scorer, then keep the ``top`` by their product."""
    scores = score_rows(rows, merger)
    return prefilter(rows, scores.quality, scores.complexity, top, scores.requests_sent, scores.failures)


def prefilter_count(top: int | float, n_rows: int) -> int:
    """How many rows a ``prefilter_top`` keeps: a count, or a fraction of the valid rows."""
    wanted = top if isinstance(top, int) else round(top * n_rows)
    return max(1, min(int(wanted), n_rows))


def prefilter(
    rows: Dataset,
    quality: Sequence[float | None],
    complexity: Sequence[float | None],
    top: int | float,
    requests_sent: int = 0,
    failures: Mapping[int, str] | None = None,
) -> PrefilterResult:
    """Keep the ``top`` rows by quality × complexity (ties: input order); ``requests_sent`` is what scoring cost.
    ``failures``: rows whose score request failed (position → reason); they cannot be ranked and are left out
    with that reason, and ``top`` as a fraction counts the rows that could be ranked."""
    failures = failures or {}
    ranked = np.asarray([i for i in range(len(rows)) if i not in failures], dtype=np.int64)
    if len(ranked) == 0:
        raise EndpointError(f"prefilter: no row could be scored; the first failure: {next(iter(failures.values()))}")
    product = np.full(len(rows), np.nan)
    product[ranked] = [quality[i] * complexity[i] for i in ranked]  # type: ignore[operator]
    keep_n = prefilter_count(top, len(ranked))
    order = ranked[np.argsort(-product[ranked], kind="stable")]
    kept = np.sort(order[:keep_n])
    cutoff = float(product[order[keep_n - 1]])
    scored = " that could be scored" if failures else ""
    with_scores = rows.add_column("quality", list(quality)).add_column("complexity", list(complexity))
    below = [
        (
            int(i),
            PREFILTER_REASON,
            f"quality {quality[i]:.2f} × complexity {complexity[i]:.2f} = {product[i]:.2f} below the cutoff "
            f"{cutoff:.2f} (the top {keep_n} of {len(ranked)} rows{scored} were kept)",
        )
        for i in order[keep_n:]
    ]
    unscored = [(i, UNSCORED_REASON, f"not ranked: {reason}") for i, reason in failures.items()]
    dropped = [
        DroppedRow(int(rows[i]["source_index"]), reason, detail, rows[i]["id"])
        for i, reason, detail in sorted(below + unscored)
    ]
    return PrefilterResult(with_scores.select(kept), dropped, cutoff, requests_sent, len(failures))


@dataclass(frozen=True)
class RowScores:
    """Each row's quality and complexity (None where its request failed, with the reason in ``failures``)."""

    quality: list[float | None]
    complexity: list[float | None]
    failures: dict[int, str]  # row position → why it could not be scored
    requests_sent: int


def score_rows(rows: Dataset, merger: Merger) -> RowScores:
    """Every row's quality and complexity, and how many requests were sent (the rest came from the cache)."""
    return run_sync(_score_all(rows, merger))


async def _score_all(rows: Dataset, merger: Merger) -> RowScores:
    config = merger.config
    complexity_template = PromptTemplate.load(config.complexity_template)
    texts = rows.select_columns(["instruction", "input", "output"]).to_list()
    async with merger.session(merging=False) as session:
        quality = dataclasses.replace(session.scorer, role="prefilter")
        scorers = {"quality": quality, "complexity": quality.with_template(complexity_template, "prefilter")}
        # disable=None: a bar on a terminal, none in logs (52k rows are 104k scores: worth watching).
        progress = tqdm(total=2 * len(texts), desc="Prefilter scores", unit="score", disable=None)

        async def one(job: tuple[str, int]) -> QualityScore | EndpointError:
            name, index = job
            score = await scorers[name].score(texts[index])
            progress.update(1)
            return score

        jobs = [(name, i) for i in range(len(texts)) for name in scorers]
        # A window of rows in flight (4 per slot), not a task per row for every row at once.
        scheduler = session.scorer.scheduler
        scores = dict(
            zip(jobs, await map_windowed(one, jobs, lambda: WINDOW_PER_SLOT * scheduler.concurrency), strict=True)
        )
        progress.close()
        return _row_scores(scores, len(texts), session.requests_sent)


def _row_scores(scores: dict[tuple[str, int], QualityScore | EndpointError], n_rows: int, sent: int) -> RowScores:
    values: dict[str, list[float | None]] = {"quality": [None] * n_rows, "complexity": [None] * n_rows}
    failures: dict[int, str] = {}
    for (name, index), score in scores.items():
        if isinstance(score, EndpointError):
            failures.setdefault(index, f"scoring the {name} failed: {score}")
        elif score.value is None:  # no digit at all: the scorer is the wrong model, not this row's problem
            raise QualityScoringError(
                f"prefilter: the {name} score of row {index} has no digit 1-6 among the top logprobs; "
                "use a Deita scorer (--scorer-endpoint) or raise top_logprobs"
            )
        else:
            values[name][index] = score.value
    if len(failures) * 2 > n_rows:
        raise EndpointError(
            f"prefilter: {len(failures)} of {n_rows} rows could not be scored; the first: "
            f"{next(iter(failures.values()))}"
        )
    return RowScores(values["quality"], values["complexity"], failures, sent)
