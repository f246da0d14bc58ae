"""Both stages end to end: load → stage 1 → merge → assemble → card → folder (and the Hub)."""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from datasets import Dataset, concatenate_datasets
from huggingface_hub import DatasetCard

from mergeit_hf.assemble import Assembly, assemble
from mergeit_hf.card import RunRecord, build_card
from mergeit_hf.config import MergeItConfig
from mergeit_hf.loading import InputFormat, LoadReport, load_rows
from mergeit_hf.merge_columns import outcome_columns
from mergeit_hf.merge_results import MergeOutcome
from mergeit_hf.merging import Merger, stage2_templates
from mergeit_hf.prefilter import PrefilterResult, prefilter
from mergeit_hf.publish import EXTRAS_FOLDER, push_to_hub, write_repo_folder
from mergeit_hf.scheduling import run_sync
from mergeit_hf.scorer_check import ScorerCheck, run_scorer_check
from mergeit_hf.stage1 import Stage1Result, run_stage1

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
        return "\n".join(lines)


def plan(
    source: str | Path | Dataset,
    config: MergeItConfig,
    *,
    column_map: Mapping[str, str] | None = None,
    input_format: InputFormat = "auto",
) -> tuple[LoadReport, Stage1Result]:
    """Load and run stage 1 only: what ``--dry-run`` reports before any LLM call."""
    rows, report = load_rows(source, input_format=input_format, column_map=column_map)
    return report, run_stage1(rows, config)


def merge_stage(pairs: Dataset, merger: Merger, max_pairs: int | None = None) -> tuple[Dataset, int]:
    """Run stage 2 over the pairs; pairs past ``max_pairs`` are kept unmerged with status ``skipped``.

    One session streams every pair through a window of 4 × the endpoint's concurrency (not ``map``
    batches, whose slowest pair would leave the slots idle at each batch's end). Returns the merged pairs
    and how many requests were actually sent (the rest came from the request cache).
    """
    limit = len(pairs) if max_pairs is None else min(max_pairs, len(pairs))
    todo = pairs.select(range(limit))
    templates = merger.templates()
    batch = run_sync(merger.merge_pairs(iter(todo), templates, window="auto", total=limit))
    columns = outcome_columns(batch.outcomes, merger.config, templates, batch.merge_model, batch.quality_model)
    merged = concatenate_datasets([todo, Dataset.from_dict(columns)], axis=1) if limit else _empty_merge(todo, merger)
    if limit < len(pairs):
        merged = with_skipped(merged, pairs.select(range(limit, len(pairs))), merger.config, limit)
    return merged, batch.stats.requests_sent


def _empty_merge(pairs: Dataset, merger: Merger) -> Dataset:
    columns = outcome_columns([], merger.config, merger.templates())
    return concatenate_datasets([pairs, Dataset.from_dict(columns)], axis=1)


def with_skipped(merged: Dataset, rest: Dataset, config: MergeItConfig, limit: int) -> Dataset:
    """Append the pairs past the limit as `skipped`: both originals stay, with the reason."""
    reason = f"not merged: this run was limited to {limit} pairs"
    columns = outcome_columns([MergeOutcome("skipped", reason)] * len(rest), config, stage2_templates(config))
    skipped = Dataset.from_dict({**rest.to_dict(), **columns})
    return concatenate_datasets([merged, skipped.cast(merged.features)])


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
) -> PipelineResult:
    """Run MergeIT on ``source``; ``endpoint`` None means ``MERGEIT_ENDPOINT`` or the embedded model."""
    config = config or MergeItConfig()
    merger = Merger(endpoint=endpoint, config=config, cache_dir=cache_dir, use_cache=use_cache, show_progress=True)
    rows, report = load_rows(source, input_format=input_format, column_map=column_map)
    prefiltered = prefilter(rows, merger, config.prefilter_top) if config.prefilter_top is not None else None
    if prefiltered:
        logger.info(prefiltered.summary())
    stage1 = run_stage1(prefiltered.kept if prefiltered else rows, config)
    check = check_scorer_before_merging(stage1, merger)
    merged_pairs, sent = merge_stage(stage1.pairs, merger, max_pairs)
    return finish_run(
        source,
        report,
        stage1,
        merged_pairs,
        sent + (prefiltered.requests_sent if prefiltered else 0),
        prefiltered=prefiltered,
        scorer_check=check,
        endpoint_given=bool(merger.resolved_endpoint),
        license=license,
        pretty_name=pretty_name,
        general_size=general_size,
    )


def check_scorer_before_merging(stage1: Stage1Result, merger: Merger) -> ScorerCheck | None:
    """The scorer check on a sample of the selected rows, where there is something to gate; warns when it fails."""
    rows = stage1.selected.select_columns(["instruction", "input", "output"]).to_list()
    if merger.config.scorer_check_rows == 0 or stage1.n_pairs == 0 or len(rows) < 2:
        return None
    check = run_scorer_check(rows, merger)
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
    prefiltered: PrefilterResult | None = None,
    scorer_check: ScorerCheck | None = None,
    endpoint_given: bool = False,
    license: str | None = None,
    pretty_name: str | None = None,
    general_size: int | None = None,
) -> PipelineResult:
    """Assemble the final rows, the accounting, the run record and the card from both stages' results."""
    from mergeit_hf import __version__

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
    record = RunRecord(
        source=str(source) if not isinstance(source, Dataset) else "<in-memory Dataset>",
        config=_recorded_config(stage1.config),
        merge_model=_model(merged_pairs, "merge_model"),
        quality_model=_model(merged_pairs, "quality_model"),
        embedding_source=stage1.embedding_source,
        created_at=created_at,
        version=__version__,
        counts=_counts(report, stage1, merged_pairs, assembly, len(left_out)),
        drop_reasons=report.drop_counts,
        unreadable=report.unreadable_detail if not report.complete else "",
        scores_incomplete=int(sum(merged_pairs["quality_scores_incomplete"])) if len(merged_pairs) else 0,
        rejection_causes=dict(Counter(c for c in merged_pairs["rejection_cause"] if c)) if len(merged_pairs) else {},
        scorer_check=scorer_check.to_dict() if scorer_check else None,
        endpoint_hint="URL" if endpoint_given else None,
        license=license,
        pretty_name=pretty_name,
        source_datasets=_hub_source(source),
        general_size=general_size,
    )
    card, figures = card_and_figures(record, assembly.final, _pairs_for_export(merged_pairs))
    return PipelineResult(report, stage1, merged_pairs, assembly, record, card, requests_sent, figures)


def _model(merged_pairs: Dataset, column: str) -> str:
    present = len(merged_pairs) and column in merged_pairs.column_names
    models = [m for m in merged_pairs[column] if m] if present else []
    return models[0] if models else "none (no pair was merged)"


def _recorded_config(config: MergeItConfig) -> dict[str, Any]:
    # A URL can name private infrastructure: the card says a scorer endpoint was set, not where.
    values = config.to_dict()
    if values.get("scorer_endpoint"):
        values["scorer_endpoint"] = "URL"
    return values


def _counts(
    report: LoadReport, stage1: Stage1Result, merged: Dataset, assembly: Assembly, prefiltered: int
) -> dict[str, int]:
    statuses = Counter(merged["merge_status"]) if len(merged) else Counter()
    return {
        "input records": report.records_read,
        "input rows": report.rows_extracted,
        "valid rows": report.rows_valid,
        **({"left out by the prefilter": prefiltered} if prefiltered else {}),
        "selected": stage1.n_selected,
        "pairs": stage1.n_pairs,
        "paired rows": stage1.n_paired_rows,
        "merges accepted": statuses.get("accepted", 0),
        "merges rejected": statuses.get("rejected", 0),
        "merges failed": statuses.get("failed", 0),
        "merges skipped": statuses.get("skipped", 0),
        "unpaired selected rows": stage1.n_unpaired_selected,
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
    return {"accounting": result.assembly.accounting, "pairs": _pairs_for_export(result.merged_pairs)}


def write_output(
    folder: str | Path, final: Dataset, pairs: Dataset, accounting: Dataset, record: RunRecord
) -> list[Path]:
    """A run folder written again from its parts (``mergeit regate``, ``mergeit card``): card and figures are
    rebuilt from the record, the layout is ``save``'s."""
    pairs = _pairs_for_export(pairs)
    card, figures = card_and_figures(record, final, pairs)
    extras = {"accounting": accounting, "pairs": pairs}
    return write_repo_folder(folder, final, card, extras, dataclasses.asdict(record), files=figures)


def card_and_figures(record: RunRecord, final: Dataset, pairs: Dataset) -> tuple[DatasetCard, dict[str, bytes]]:
    """The card and the images it shows (``mergeit/retention.png``, ``mergeit/sweep.png``) when pairs were scored."""
    figures = run_figures(record, pairs)
    return build_card(record, final, pairs, figures=sorted(figures)), figures


def run_figures(record: RunRecord, pairs: Dataset) -> dict[str, bytes]:
    from mergeit_hf import figures, regate

    if len(pairs) == 0 or "attempt_log" not in pairs.column_names:
        return {}
    scored = pairs.filter(lambda status: status in regate.SCORED, input_columns="merge_status")
    if len(scored) == 0:
        return {}
    alpha, min_retention = float(record.config["alpha"]), float(record.config["min_retention"])
    table = regate.sweep(regate.scored_pairs(scored), current=(alpha, min_retention))
    folder = EXTRAS_FOLDER
    images = {f"{folder}/{figures.SWEEP_FIGURE}": figures.sweep_figure(table)}
    if any(value is not None for value in scored["retention_a"]):  # none with compute_retention off
        images[f"{folder}/{figures.RETENTION_FIGURE}"] = figures.retention_figure(
            scored["retention_a"], scored["retention_b"], scored["merge_status"], min_retention
        )
    return images


def retention_quartiles(pairs: Dataset) -> list[float]:
    """25th, 50th and 75th percentile of the weaker source's retention over the scored merges."""
    import numpy as np

    if len(pairs) == 0 or "retention_a" not in pairs.column_names:
        return []
    weaker = [min(a, b) for a, b in zip(pairs["retention_a"], pairs["retention_b"], strict=True) if a is not None]
    return [float(q) for q in np.percentile(weaker, [25, 50, 75])] if weaker else []


def _pairs_for_export(pairs: Dataset) -> Dataset:
    return pairs.remove_columns([c for c in ("embedding",) if c in pairs.column_names])


def render_card_again(folder: str | Path) -> DatasetCard:
    """``mergeit card DIR``: rebuild README.md (and its figures) from the saved run record, data and pairs."""
    from mergeit_hf.regate import OutputFolder

    out = OutputFolder.open(folder)
    write_output(out.folder, out.final, out.pairs, out.accounting, out.record)
    return DatasetCard((out.folder / "README.md").read_text(encoding="utf-8"))


def read_parquet(paths: list[Path]) -> Dataset:
    # pyarrow, not Dataset.from_parquet: the latter refuses a file with zero rows (a run without pairs).
    import pyarrow as pa
    import pyarrow.parquet as pq

    return Dataset(pa.concat_tables([pq.read_table(path) for path in paths]))
