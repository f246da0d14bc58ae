"""Both stages end to end: load → stage 1 → merge → assemble → card → folder (and the Hub)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from datasets import Dataset
from huggingface_hub import DatasetCard

from mergeit_hf._version import __version__
from mergeit_hf.config import MergeItConfig
from mergeit_hf.endpoints.probe import model_label
from mergeit_hf.endpoints.sending.limit import RequestLedger
from mergeit_hf.engines.choice import Engine
from mergeit_hf.errors import QualityScoringError
from mergeit_hf.inputs.loading import InputFormat, LoadReport, load_rows
from mergeit_hf.output.assemble import Assembly, assemble
from mergeit_hf.output.card import RunRecord
from mergeit_hf.output.folder import card_and_figures, pairs_for_export
from mergeit_hf.output.publish import push_to_hub, write_repo_folder
from mergeit_hf.stage1.result import Stage1Result
from mergeit_hf.stage2.merge.merger import Merger
from mergeit_hf.stage2.merge.results import OutcomeCounts
from mergeit_hf.stage2.prefilter import PrefilterResult, prefilter_rows
from mergeit_hf.stage2.scorer_check import ScorerCheck, run_scorer_check

logger = logging.getLogger(__name__)


@dataclass
class PipelineResult:
    """Everything a run produced, with the counts that explain it."""

    report: LoadReport
    stage1: Stage1Result
    merged_pairs: Dataset
    assembly: Assembly
    record: RunRecord
    card: DatasetCard
    requests_sent: int
    figures: dict[str, bytes] = dataclasses.field(default_factory=dict)  # the images the card shows, by repo path

    @property
    def final(self) -> Dataset:
        return self.assembly.final

    def summary_table(self) -> str:
        record = self.record
        width = max(len(step) for step in [*record.counts, "rejected for quality and retention"])
        lines = [f"{step:<{width}}  {count:>8}" for step, count in record.counts.items()]
        lines += [f"{'rejected for ' + cause:<{width}}  {n:>8}" for cause, n in record.rejection_causes.items()]
        lines.append(f"{'acceptance rate':<{width}}  {record.acceptance_rate:>8.1%}")
        quartiles = retention_quartiles(self.merged_pairs)
        if quartiles:
            lines.append(f"{'weaker-side retention':<{width}}  " + " / ".join(f"{q:.2f}" for q in quartiles))
            lines.append(
                f"{'':<{width}}  (25th / 50th / 75th percentile; min_retention {record.config['min_retention']})"
            )
        if record.scorer_check:
            check = record.scorer_check
            verdict = "ok" if check["passed"] else f"BELOW {check['min_accuracy']}: the gate is noise"
            lines.append(f"{'scorer accuracy':<{width}}  {check['accuracy']:>8.2f}  (n={check['rows']}, {verdict})")
        lines.append(f"{'LLM requests sent':<{width}}  {self.requests_sent:>8}")
        if record.requests:
            requests = record.requests
            by_role = ", ".join(f"{role} {n}" for role, n in requests["by_role"].items())
            lines.append(
                f"{'':<{width}}  ({by_role}; {requests['retried']} retried, {requests['throttled']} throttled)"
            )
        tokens = record.tokens
        if tokens:
            lines.append(
                f"{'tokens (prompt / completion)':<{width}}  {tokens['prompt_tokens']} / {tokens['completion_tokens']}"
                f"  (over {tokens['pairs_counted']} pairs, cached replies included)"
            )
        for role, described in record.endpoints.items():
            lines.append(f"{role + ' endpoint':<{width}}  " + ", ".join(f"{k}: {v}" for k, v in described.items()))
        return "\n".join(lines)


def plan(
    source: str | Path | Dataset,
    config: MergeItConfig,
    *,
    column_map: Mapping[str, str] | None = None,
    input_format: InputFormat = "auto",
    engine: Engine | None = None,
) -> tuple[LoadReport, Stage1Result]:
    """Load and run stage 1 only: what ``--dry-run`` reports before any LLM call."""
    rows, report = load_rows(source, input_format=input_format, column_map=column_map)
    return report, (engine or Engine()).run_stage1(rows, config)


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
) -> PipelineResult:
    """Run MergeIT on ``source``; ``endpoint`` None means ``MERGEIT_ENDPOINT`` or the embedded model.
    ``engine`` (default: datasets, on this machine) runs stage 1 and the merges; the rest is the same.
    ``on_loaded`` is called with the load report as soon as the input is read."""
    config = config or MergeItConfig()
    engine = engine or Engine()
    merger = Merger(endpoint=endpoint, config=config, cache_dir=cache_dir, use_cache=use_cache, show_progress=True)
    rows, report = load_rows(source, input_format=input_format, column_map=column_map)
    if on_loaded is not None:  # the CLI prints what was read before the long stages start
        on_loaded(report)
    # Every endpoint (merge, scorer, judge) probed before the long stages: a refused key, an unknown model or
    # a server that is not there stops the run in seconds, not after hours of embedding.
    merger.check_endpoints()
    prefiltered = prefilter_rows(rows, merger, config.prefilter_top) if config.prefilter_top is not None else None
    if prefiltered:
        logger.info(prefiltered.summary())
    stage1 = engine.run_stage1(prefiltered.kept if prefiltered else rows, config)
    check = check_scorer_before_merging(stage1, merger)
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
    )


def check_scorer_before_merging(stage1: Stage1Result, merger: Merger) -> ScorerCheck | None:
    """The scorer check on a sample of the selected rows, where there is something to gate; warns when it fails."""
    rows = stage1.selected.select_columns(["instruction", "input", "output"]).to_list()
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


def finish_run(
    source: str | Path | Dataset,
    report: LoadReport,
    stage1: Stage1Result,
    merged_pairs: Dataset,
    requests_sent: int,
    *,
    ledger: RequestLedger | None = None,
    prefiltered: PrefilterResult | None = None,
    scorer_check: ScorerCheck | None = None,
    endpoints: dict[str, dict[str, str]] | None = None,
    endpoint_given: bool = False,
    license: str | None = None,
    pretty_name: str | None = None,
    general_size: int | None = None,
    engine: str = "datasets",
) -> PipelineResult:
    """Assemble the final rows, the accounting, the run record and the card from both stages' results."""
    created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    left_out = prefiltered.dropped if prefiltered else []
    assembly = assemble(
        stage1.selected,
        stage1.rows,
        merged_pairs,
        report,
        version=__version__,
        created_at=created_at,
        prefiltered=left_out,
    )
    outcomes = OutcomeCounts.of_pairs(merged_pairs)
    record = RunRecord(
        source=str(source) if not isinstance(source, Dataset) else "<in-memory Dataset>",
        config=_recorded_config(stage1.config),
        merge_model=_model(merged_pairs, "merge_model"),
        quality_model=_model(merged_pairs, "quality_model"),
        embedding_source=stage1.embedding_source,
        created_at=created_at,
        version=__version__,
        counts=_counts(report, stage1, outcomes, assembly, len(left_out)),
        drop_reasons=report.drop_counts,
        unreadable=report.unreadable_detail if not report.complete else "",
        scores_incomplete=outcomes.scores_incomplete,
        rejection_causes=outcomes.rejection_causes,
        scorer_check=scorer_check.to_dict() if scorer_check else None,
        endpoints=endpoints or {},
        tokens=token_totals(merged_pairs),
        requests=ledger.to_dict() if ledger else {},
        endpoint_hint="URL" if endpoint_given else None,
        license=license,
        pretty_name=pretty_name,
        source_datasets=_hub_source(source),
        general_size=general_size,
        engine=engine,
    )
    card, figures = card_and_figures(record, assembly.final, pairs_for_export(merged_pairs))
    return PipelineResult(report, stage1, merged_pairs, assembly, record, card, requests_sent, figures)


def _model(merged_pairs: Dataset, column: str) -> str:
    present = len(merged_pairs) and column in merged_pairs.column_names
    models = [m for m in merged_pairs[column] if m] if present else []
    return models[0] if models else "none (no pair was merged)"


def _recorded_config(config: MergeItConfig) -> dict[str, Any]:
    """The config as the card and run.json publish it: a URL can name private infrastructure and a local
    path the user's folders, so endpoints say only that one was set, and model paths keep their file name."""
    values = config.to_dict()
    for name in ("scorer_endpoint", "judge_endpoint"):
        if values.get(name):
            values[name] = "URL"
    for name in ("local_model", "retention_model", "embedding_model"):
        if values.get(name):
            values[name] = model_label(str(values[name]))
    return values


def _counts(
    report: LoadReport, stage1: Stage1Result, outcomes: OutcomeCounts, assembly: Assembly, prefiltered: int
) -> dict[str, int]:
    conversations = stage1.conversation_counts()
    kept_whole = conversations.pop("multi-turn kept (not merged)", 0)
    return {
        "input records": report.records_read,
        "input rows": report.rows_extracted,
        "valid rows": report.rows_valid,
        **conversations,
        **({"left out by the prefilter": prefiltered} if prefiltered else {}),
        "selected": stage1.n_selected,
        "pairs": stage1.n_pairs,
        "paired rows": stage1.n_paired_rows,
        **outcomes.lines(),
        "unpaired selected rows": stage1.n_unpaired_selected,
        **({"multi-turn kept (not merged)": kept_whole} if kept_whole else {}),
        "final rows": len(assembly.final),
    }


def _hub_source(source: str | Path | Dataset) -> list[str]:
    if isinstance(source, str) and not Path(source).exists() and "/" in source:
        return [source]
    return []


def save(result: PipelineResult, folder: str | Path) -> list[Path]:
    """Write the repository layout (data, card, figures, accounting, pairs, run record) to ``folder``."""
    record = dataclasses.asdict(result.record)
    return write_repo_folder(folder, result.final, result.card, _extras(result), record, files=result.figures)


def publish(result: PipelineResult, repo_id: str, *, private: bool = False, api: Any = None) -> Any:
    """Push the same layout as ``save`` to a Hub dataset repo, in one commit."""
    return push_to_hub(
        result.final,
        repo_id,
        result.card,
        extras=_extras(result),
        files=result.figures,
        run_record=dataclasses.asdict(result.record),
        private=private,
        api=api,
    )


def _extras(result: PipelineResult) -> dict[str, Dataset]:
    return {"accounting": result.assembly.accounting, "pairs": pairs_for_export(result.merged_pairs)}


def token_totals(pairs: Dataset) -> dict[str, int]:
    """Prompt and completion tokens over the pairs (as their servers reported them), and pairs with a count."""
    if len(pairs) == 0 or "prompt_tokens" not in pairs.column_names:
        return {}
    counted = [(p, c) for p, c in zip(pairs["prompt_tokens"], pairs["completion_tokens"], strict=True) if p is not None]
    if not counted:
        return {}
    return {
        "prompt_tokens": sum(p for p, _ in counted),
        "completion_tokens": sum(c for _, c in counted),
        "pairs_counted": len(counted),
    }


def retention_quartiles(pairs: Dataset) -> list[float]:
    """25th, 50th and 75th percentile of the weaker source's retention over the scored merges."""
    import numpy as np

    if len(pairs) == 0 or "retention_a" not in pairs.column_names:
        return []
    weaker = [min(a, b) for a, b in zip(pairs["retention_a"], pairs["retention_b"], strict=True) if a is not None]
    return [float(q) for q in np.percentile(weaker, [25, 50, 75])] if weaker else []
