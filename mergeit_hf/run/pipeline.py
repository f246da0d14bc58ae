"""Both stages end to end: load → probe the endpoints → (prefilter) → stage 1 → scorer check → merge, then
``finish`` (final rows, accounting, card), the folder and the Hub."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from datasets import Dataset

from mergeit_hf.config import MergeItConfig
from mergeit_hf.engines.choice import Engine
from mergeit_hf.errors import ConfigError, EndpointError, QualityScoringError
from mergeit_hf.inputs.loading import InputFormat, LoadReport
from mergeit_hf.run.batch_rounds import check_batch_api, merge_in_rounds
from mergeit_hf.run.finish import PipelineResult, finish_run, publish, save, token_totals
from mergeit_hf.stage1.result import Stage1Result
from mergeit_hf.stage2.merge.merger import Merger
from mergeit_hf.stage2.prefilter import prefilter_rows
from mergeit_hf.stage2.scorer_check import ScorerCheck, run_scorer_check

__all__ = [
    "PipelineResult",
    "check_scorer_before_merging",
    "finish_run",
    "plan",
    "publish",
    "run_pipeline",
    "save",
    "token_totals",
]
logger = logging.getLogger(__name__)


def plan(
    source: str | Path | Dataset,
    config: MergeItConfig,
    *,
    column_map: Mapping[str, str] | None = None,
    input_format: InputFormat = "auto",
    engine: Engine | None = None,
) -> tuple[LoadReport, Stage1Result]:
    """Load and run stage 1 only: what ``--dry-run`` reports before any LLM call."""
    engine = engine or Engine()
    rows, report = engine.load(source, input_format=input_format, column_map=column_map)
    return report, engine.run_stage1(rows, config)


def run_pipeline(
    source: str | Path | Dataset,
    config: MergeItConfig | None = None,
    *,
    endpoint: str | None = None,
    cache_dir: str | None = None,
    use_cache: bool = True,
    column_map: Mapping[str, str] | None = None,
    input_format: InputFormat = "auto",
    max_pairs: int | None = None,
    license: str | None = None,
    pretty_name: str | None = None,
    general_size: int | None = None,
    engine: Engine | None = None,
    on_loaded: Callable[[LoadReport], None] | None = None,
    output: Path | None = None,
) -> PipelineResult:
    """Run MergeIT on ``source``; ``endpoint`` None means ``MERGEIT_ENDPOINT`` or the embedded model.
    ``engine`` (default: datasets, on this machine) runs stage 1 and the merges; the rest is the same.
    ``on_loaded`` is called with the load report as soon as the input is read. With ``config.batch``, stage 2
    runs in rounds through the endpoint's batch API, resumable from ``output`` (the folder ``save`` writes)."""
    config = config or MergeItConfig()
    engine = engine or Engine()
    merger = Merger(
        endpoint=endpoint,
        config=config,
        cache_dir=cache_dir,
        use_cache=use_cache,
        show_progress=True,
        shared_cache=engine.shares_cache,
    )
    prefiltering = config.prefilter_top is not None  # the prefilter scores the rows on the driver
    rows, report = engine.load(source, input_format=input_format, column_map=column_map, on_driver=prefiltering)
    if on_loaded is not None:  # the CLI prints what was read before the long stages start
        on_loaded(report)
    if config.batch:  # before the probes: the embedded model would load only to be refused
        if output is None:
            raise ConfigError("batch runs keep their state in the output folder: pass output=")
        check_batch_api(merger, engine)
    # Every endpoint (merge, scorer, judge) probed before the long stages: a refused key, an unknown model or
    # a server that is not there stops the run in seconds, not after hours of embedding.
    merger.check_endpoints()
    with _resumable():  # the prefilter's scores are cached as they come
        prefiltered = prefilter_rows(rows, merger, config.prefilter_top) if config.prefilter_top is not None else None
    if prefiltered:
        logger.info(prefiltered.summary())
    stage1 = engine.run_stage1(prefiltered.kept if prefiltered else rows, config)
    batched: dict[str, Any] | None = None
    with _resumable():
        check = check_scorer_before_merging(stage1, merger)
        if config.batch:
            assert output is not None
            merged_pairs, batch, batched = merge_in_rounds(stage1.pairs, merger, engine, Path(output), max_pairs)
        else:
            merged_pairs, batch = engine.merge_stage(stage1.pairs, merger, max_pairs)
    return finish_run(
        source,
        report,
        stage1,
        merged_pairs,
        merger.ledger.total,
        ledger=merger.ledger,
        prefiltered=prefiltered,
        scorer_check=check,
        endpoints=batch.endpoints,
        endpoint_given=bool(merger.resolved_endpoint),
        license=license,
        pretty_name=pretty_name,
        general_size=general_size,
        engine=engine.description,
        batch=batched,
    )


#: Added to an error that stops the run once answers have come back (the CLI prints it under the error).
RESUME_NOTE = "every answer received so far is in the request cache: the same command resumes from there"


@contextmanager
def _resumable() -> Iterator[None]:
    """Errors once requests are sent (the prefilter, the scorer check, the merges: answers are cached as they
    come) say how to resume; an error before (a probe's refusal, bad input) does not: nothing was received."""
    try:
        yield
    except (EndpointError, QualityScoringError) as exc:
        notes = list(getattr(exc, "__notes__", ()))  # (``add_note`` is Python 3.11's; this runs on 3.10 too)
        if RESUME_NOTE not in notes:
            exc.__notes__ = [*notes, RESUME_NOTE]
        raise


def check_scorer_before_merging(stage1: Stage1Result, merger: Merger) -> ScorerCheck | None:
    """The scorer check on a sample of the selected rows, where there is something to gate; warns when it fails."""
    # The Dataset itself: the check reads its sample's rows, not the whole selection as Python dicts.
    rows = stage1.selected.select_columns(["instruction", "input", "output"])
    if merger.config.scorer_check_rows == 0 or stage1.n_pairs == 0 or len(rows) < 2:
        return None
    check = run_scorer_check(rows, merger)
    if check.no_digits:  # nothing to gate on: every merge would fail, so stop before sending any
        raise QualityScoringError(
            f"the scorer check's {check.unavailable} scores had no digit 1-6 among the top "
            f"{merger.config.top_logprobs} logprobs: this model does not answer Deita's prompt with a score. "
            "Use a Deita scorer (--scorer-endpoint) or a >= 1.5B instruct model, or raise top_logprobs."
        )
    if not check.passed:
        logger.warning(check.report().splitlines()[-2])
    return check
