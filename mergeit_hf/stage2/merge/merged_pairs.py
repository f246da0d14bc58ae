"""Stage 2's result as a dataset, whichever engine merged: the pairs joined to their outcome columns, and
the pairs past a run's limit kept as ``skipped``."""

from __future__ import annotations

from datasets import Dataset, concatenate_datasets

from mergeit_hf.config import MergeItConfig
from mergeit_hf.stage2.merge.columns import outcome_columns, outcome_dataset
from mergeit_hf.stage2.merge.merger import Merger, stage2_templates
from mergeit_hf.stage2.merge.results import MergeBatch, MergeOutcome


def merged_pairs_dataset(pairs: Dataset, todo: Dataset, batch: MergeBatch, merger: Merger, limit: int) -> Dataset:
    """The pairs merged so far (``todo``, in order) joined to their outcome columns, then the pairs past
    ``limit`` as skipped: what every engine's stage 2 returns."""
    templates = merger.templates()
    columns = outcome_columns(batch.outcomes, merger.config, templates, batch.merge_model, batch.quality_model)
    # Typed outcome columns: with no pair merged (limit 0) the columns are empty, never null-typed.
    merged = concatenate_datasets([todo, outcome_dataset(columns, merger.config)], axis=1)
    if limit < len(pairs):
        merged = with_skipped(merged, pairs.select(range(limit, len(pairs))), merger.config, limit)
    return merged


def with_skipped(merged: Dataset, rest: Dataset, config: MergeItConfig, limit: int) -> Dataset:
    """Append the pairs past the limit as `skipped`: both originals stay, with the reason."""
    reason = f"not merged: this run was limited to {limit} pairs"
    columns = outcome_columns([MergeOutcome("skipped", reason)] * len(rest), config, stage2_templates(config))
    skipped = concatenate_datasets([rest, outcome_dataset(columns, config)], axis=1)
    return concatenate_datasets([merged, skipped.cast(merged.features)])
