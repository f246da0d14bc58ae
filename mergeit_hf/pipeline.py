"""Both stages end to end: load → stage 1 → merge → assemble → card → folder (and the Hub)."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from datasets import Dataset
from huggingface_hub import DatasetCard

from mergeit_hf.assemble import Assembly, assemble
from mergeit_hf.card import RunRecord, build_card
from mergeit_hf.config import MergeItConfig
from mergeit_hf.loading import InputFormat, LoadReport, load_rows
from mergeit_hf.merging import MergeOutcome, Merger, default_cache_dir, outcome_columns
from mergeit_hf.prompts import PromptTemplate
from mergeit_hf.publish import push_to_hub, write_repo_folder
from mergeit_hf.request_cache import RequestCache
from mergeit_hf.stage1 import Stage1Result, run_stage1

MERGE_BATCH_PAIRS = 32


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

    @property
    def final(self) -> Dataset:
        return self.assembly.final

    def summary_table(self) -> str:
        width = max(len(step) for step in self.record.counts)
        lines = [f"{step:<{width}}  {count:>8}" for step, count in self.record.counts.items()]
        lines.append(f"{'acceptance rate':<{width}}  {self.record.acceptance_rate:>8.1%}")
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


def merge_stage(pairs: Dataset, merger: Merger, max_pairs: int | None = None, **map_kwargs: Any) -> tuple[Dataset, int]:
    """Run stage 2 over the pairs; pairs past ``max_pairs`` are kept unmerged with status ``skipped``.

    Returns the merged pairs and how many requests were actually sent (the rest came from the cache).
    """
    limit = len(pairs) if max_pairs is None else min(max_pairs, len(pairs))
    cache = RequestCache((merger.cache_dir or default_cache_dir()) if merger.use_cache else None)
    cached_before = len(cache)
    merged = pairs.select(range(limit)).map(
        merger, batched=True, batch_size=MERGE_BATCH_PAIRS, desc="Merging pairs", **map_kwargs
    )
    sent = len(cache) - cached_before if cache.enabled else -1
    cache.close()
    if limit < len(pairs):
        merged = with_skipped(merged, pairs.select(range(limit, len(pairs))), merger.config, limit)
    return merged, sent


def with_skipped(merged: Dataset, rest: Dataset, config: MergeItConfig, limit: int) -> Dataset:
    """Append the pairs past the limit as `skipped`: both originals stay, with the reason."""
    from datasets import concatenate_datasets

    templates = (PromptTemplate.load(config.merge_template), PromptTemplate.load(config.quality_template))
    reason = f"not merged: this run was limited to {limit} pairs"
    columns = outcome_columns([MergeOutcome("skipped", reason)] * len(rest), "", config, templates)
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
    report, stage1 = plan(source, config, column_map=column_map, input_format=input_format)
    merger = Merger(endpoint=endpoint, config=config, cache_dir=cache_dir, use_cache=use_cache)
    merged_pairs, sent = merge_stage(stage1.pairs, merger, max_pairs)
    return finish_run(
        source,
        report,
        stage1,
        merged_pairs,
        sent,
        endpoint_given=bool(merger.resolved_endpoint),
        license=license,
        pretty_name=pretty_name,
        general_size=general_size,
    )


def finish_run(
    source: str | Path | Dataset,
    report: LoadReport,
    stage1: Stage1Result,
    merged_pairs: Dataset,
    requests_sent: int,
    *,
    endpoint_given: bool = False,
    license: str | None = None,
    pretty_name: str | None = None,
    general_size: int | None = None,
) -> PipelineResult:
    """Assemble the final rows, the accounting, the run record and the card from both stages' results."""
    from mergeit_hf import __version__

    created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    assembly = assemble(stage1.selected, stage1.rows, merged_pairs, report, version=__version__, created_at=created_at)
    record = RunRecord(
        source=str(source) if not isinstance(source, Dataset) else "<in-memory Dataset>",
        config=stage1.config.to_dict(),
        merge_model=_merge_model(merged_pairs),
        created_at=created_at,
        version=__version__,
        counts=_counts(report, stage1, merged_pairs, assembly),
        drop_reasons=report.drop_counts,
        unreadable=report.unreadable_detail if not report.complete else "",
        scores_incomplete=int(sum(merged_pairs["quality_scores_incomplete"])) if len(merged_pairs) else 0,
        endpoint_hint="URL" if endpoint_given else None,
        license=license,
        pretty_name=pretty_name,
        source_datasets=_hub_source(source),
        general_size=general_size,
    )
    card = build_card(record, assembly.final, merged_pairs)
    return PipelineResult(report, stage1, merged_pairs, assembly, record, card, requests_sent)


def _merge_model(merged_pairs: Dataset) -> str:
    models = [m for m in merged_pairs["merge_model"] if m] if len(merged_pairs) else []
    return models[0] if models else "none (no pair was merged)"


def _counts(report: LoadReport, stage1: Stage1Result, merged: Dataset, assembly: Assembly) -> dict[str, int]:
    statuses = Counter(merged["merge_status"]) if len(merged) else Counter()
    return {
        "input records": report.records_read,
        "input rows": report.rows_extracted,
        "valid rows": report.rows_valid,
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
    """Write the repository layout (data, card, accounting, pairs, run record) to ``folder``."""
    return write_repo_folder(folder, result.final, result.card, _extras(result), dataclasses.asdict(result.record))


def publish(result: PipelineResult, repo_id: str, *, private: bool = False, api: Any = None) -> Any:
    """Push the same layout as ``save`` to a Hub dataset repo, in one commit."""
    return push_to_hub(
        result.final,
        repo_id,
        result.card,
        extras=_extras(result),
        run_record=dataclasses.asdict(result.record),
        private=private,
        api=api,
    )


def _extras(result: PipelineResult) -> dict[str, Dataset]:
    return {"accounting": result.assembly.accounting, "pairs": _pairs_for_export(result.merged_pairs)}


def _pairs_for_export(pairs: Dataset) -> Dataset:
    return pairs.remove_columns([c for c in ("embedding",) if c in pairs.column_names])


def render_card_again(folder: str | Path) -> DatasetCard:
    """``mergeit card DIR``: rebuild README.md from the saved run record, data and pairs."""
    folder = Path(folder)
    record_path = folder / "mergeit" / "run.json"
    if not record_path.is_file():
        from mergeit_hf.errors import InputError

        raise InputError(f"{folder} holds no mergeit/run.json: is it the --output folder of `mergeit run`?")
    record = RunRecord.load(record_path)
    final = _read_parquet(sorted((folder / "data").glob("train-*.parquet")))
    pairs = _read_parquet([folder / "mergeit" / "pairs.parquet"])
    card = build_card(record, final, pairs)
    (folder / "README.md").write_text(str(card), encoding="utf-8")
    return card


def _read_parquet(paths: list[Path]) -> Dataset:
    # pyarrow, not Dataset.from_parquet: the latter refuses a file with zero rows (a run without pairs).
    import pyarrow as pa
    import pyarrow.parquet as pq

    return Dataset(pa.concat_tables([pq.read_table(path) for path in paths]))
