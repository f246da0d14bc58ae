"""The final dataset and the fate of every input row, from stage 1's rows and stage 2's merged pairs.

Final rows (``final_rows``): accepted merges, both originals of each rejected or failed pair, and the
selected rows that found no pair (as the authors' scripts keep them). ``accounting`` says for each input
row whether it was dropped at validation, not selected, merged into row X, or kept as is.

Built a batch at a time with ``Dataset.map`` and with Arrow compute, never a Python object per input row.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, DatasetInfo, Features, Value, concatenate_datasets
from datasets.fingerprint import generate_random_fingerprint

from mergeit_hf.embeddings.arrow import arrow_columns
from mergeit_hf.inputs.batches import batch_rows
from mergeit_hf.inputs.loading import DroppedRow, LoadReport
from mergeit_hf.output.final_rows import PROVENANCE_FEATURES, final_columns, original_row, pair_rows
from mergeit_hf.progress import datasets_bars_off

ACCOUNTING_FEATURES = Features(
    {
        "id": Value("string"),
        "source_index": Value("int64"),
        "fate": Value("string"),
        "detail": Value("string"),
        "output_id": Value("string"),
    }
)
_ACCOUNTING_SCHEMA = ACCOUNTING_FEATURES.arrow_schema
FATES = (
    "dropped",
    "prefiltered",
    "not selected",
    "merged",
    "kept: merge rejected",
    "kept: merge failed",
    "kept: merge skipped",
    "kept: unpaired",
    "kept: multi-turn (not merged)",
)
#: Pairs turned into final rows at once: a pair carries its sources' texts and turns, often kilobytes each.
PAIRS_PER_BATCH = 100
NOT_SELECTED_DETAIL = "facility location kept other rows of its topic"
UNPAIRED_DETAIL = "no partner with similarity >= tau in its cluster"
MULTI_TURN_FATE = "kept: multi-turn (not merged)"
MULTI_TURN_DETAIL = "a conversation of several user turns is kept whole: it is never cut into turns or merged"


@dataclass
class Assembly:
    """The final dataset, the per-input-row accounting, and counts that explain them."""

    final: Dataset
    accounting: Dataset

    @property
    def fate_counts(self) -> dict[str, int]:
        return _value_counts(self.accounting, "fate")

    @property
    def origin_counts(self) -> dict[str, int]:
        return _value_counts(self.final, "origin")


def _value_counts(dataset: Dataset, column: str) -> dict[str, int]:
    """Each value's count, in order of first appearance (as ``Counter``), counted by Arrow: no Python string
    per row (the accounting has one row per input row)."""
    counts = arrow_columns(dataset, [column])[column].value_counts()
    return {item["values"].as_py(): item["counts"].as_py() for item in counts}


def assemble(
    selected: Dataset,
    all_rows: Dataset,
    merged_pairs: Dataset,
    report: LoadReport,
    *,
    version: str,
    created_at: str | None = None,
    prefiltered: list[DroppedRow] | None = None,
) -> Assembly:
    """Build the final dataset and the accounting of every input row.

    selected: stage 1 rows kept by facility location; all_rows: every valid row (``selected`` column);
    merged_pairs: the pairs dataset after stage 2 (``merge_status`` and the merged fields);
    prefiltered: valid rows the prefilter left out before stage 1 (not in ``all_rows``).

    Built a batch at a time with ``Dataset.map`` and with Arrow compute, never a Python object per input row:
    the rows stay where their Dataset keeps them (memory-mapped files, for a run's stage 1).
    """
    created_at = created_at or datetime.now(timezone.utc).isoformat(timespec="seconds")
    with datasets_bars_off():
        from_pairs = _rows_from_pairs(merged_pairs, created_at, version)
        pair_fates = _fates_of_pair_sources(from_pairs)
        unpaired = _unpaired_selected(selected, pair_fates["id"])
        final = _sorted(concatenate_datasets([from_pairs, _original_rows(unpaired, created_at, version)]))
        fates = pa.concat_tables([pair_fates, _fates_of_unpaired(unpaired)])
        return Assembly(final, _accounting(all_rows, report, fates, prefiltered or []))


def _rows_from_pairs(merged_pairs: Dataset, created_at: str, version: str) -> Dataset:
    """The final rows the pairs make (``pair_rows``), a batch of pairs at a time."""
    needed = merged_pairs.select_columns([name for name in merged_pairs.column_names if name != "embedding"])
    return _as_final_rows(needed, _pair_batch, created_at, version, batch_size=PAIRS_PER_BATCH)


def _as_final_rows(rows: Dataset, batch: Callable, created_at: str, version: str, batch_size: int = 1000) -> Dataset:
    if len(rows) == 0:  # datasets' map over no rows returns no columns at all, whatever the features given
        return Dataset.from_dict({name: [] for name in PROVENANCE_FEATURES}, features=PROVENANCE_FEATURES)
    return rows.map(
        batch,
        batched=True,
        batch_size=batch_size,
        remove_columns=rows.column_names,
        features=PROVENANCE_FEATURES,
        fn_kwargs={"created_at": created_at, "version": version},
        cache_file_name=_work_file(),
    )


def _pair_batch(batch: dict[str, list], created_at: str, version: str) -> dict[str, list]:
    rows, _ = pair_rows(batch_rows(batch), created_at, version)
    return final_columns(rows)


def _original_rows(unpaired: Dataset, created_at: str, version: str) -> Dataset:
    """Each selected row that found no pair, as it came (``original_row``)."""
    return _as_final_rows(unpaired, _unpaired_batch, created_at, version)


def _unpaired_batch(batch: dict[str, list], created_at: str, version: str) -> dict[str, list]:
    return final_columns([original_row(row, created_at, version) for row in batch_rows(batch)])


def _fates_of_pair_sources(from_pairs: Dataset) -> pa.Table:
    """(id, fate, detail, output_id) of every source in a pair, read off the final rows the pairs made: a
    merge names its sources in ``source_ids``; an original kept stands for itself, with its pair's status."""
    rows = arrow_columns(from_pairs, ["id", "source_ids", "merge_status", "merge_reason"])
    owner = pc.list_parent_indices(rows["source_ids"])
    status = rows["merge_status"].take(owner)
    fate = pc.if_else(pc.equal(status, "accepted"), "merged", pc.binary_join_element_wise("kept: merge ", status, ""))
    return pa.table(
        {
            "id": pc.list_flatten(rows["source_ids"]),
            "fate": fate,
            "detail": rows["merge_reason"].take(owner),
            "output_id": rows["id"].take(owner),
        }
    )


def _unpaired_selected(selected: Dataset, paired_ids: pa.ChunkedArray) -> Dataset:
    """The selected rows in no pair, with the columns an original row takes."""
    columns = ["id", "instruction", "input", "output", "cluster_id"]
    conversational = [name for name in ("system", "messages", "multi_turn") if name in selected.column_names]
    rows = selected.select_columns(columns + conversational)
    ids = arrow_columns(rows, ["id"])["id"]
    in_a_pair = pc.is_in(ids, value_set=paired_ids.combine_chunks())
    unpaired = np.flatnonzero(~np.asarray(in_a_pair, dtype=bool))
    return rows.select(unpaired, new_fingerprint=_unhashed(), indices_cache_file_name=_work_file())


def _fates_of_unpaired(unpaired: Dataset) -> pa.Table:
    ids = arrow_columns(unpaired, ["id"])["id"].cast(pa.string())
    if "multi_turn" in unpaired.column_names:
        multi = arrow_columns(unpaired, ["multi_turn"])["multi_turn"]
        multi = multi.cast(pa.bool_()).fill_null(False)
    else:
        multi = pa.repeat(False, len(ids))
    return pa.table(
        {
            "id": ids,
            "fate": pc.if_else(multi, MULTI_TURN_FATE, "kept: unpaired"),
            "detail": pc.if_else(multi, MULTI_TURN_DETAIL, UNPAIRED_DETAIL),
            "output_id": ids,
        }
    )


def _sorted(final: Dataset) -> Dataset:
    """By topic, then id (as ``final_dataset``): an order of indices, computed by Arrow on the two columns."""
    keys = arrow_columns(final, ["cluster_id", "id"])
    order = pc.sort_indices(keys, sort_keys=[("cluster_id", "ascending"), ("id", "ascending")])
    # Flattened once: through an indices mapping, every later read (the parquet files, the card's examples)
    # gathers row by row, and writing 57,000 rows so kept 200 MiB more than writing them flattened (measured).
    ordered = final.select(order.to_numpy(), new_fingerprint=_unhashed(), indices_cache_file_name=_work_file())
    return ordered.flatten_indices(new_fingerprint=_unhashed(), cache_file_name=_work_file())


def _accounting(all_rows: Dataset, report: LoadReport, fates: pa.Table, prefiltered: list[DroppedRow]) -> Dataset:
    """One row per input row, in input order: dropped at reading, left out by the prefilter, not selected, or
    the fate of a selected row (``fates``, by id). Arrow columns throughout: one row per input row."""
    valid = arrow_columns(all_rows, ["id", "source_index", "selected"])
    selected = pc.fill_null(valid["selected"], False)
    where = pc.index_in(valid["id"], value_set=fates["id"].combine_chunks())  # null: the id has no fate
    lost = pc.sum(pc.and_(selected, pc.is_null(where))).as_py()
    if lost:  # every selected row is in a pair or kept unpaired: a gap here is a bug, never a silent drop
        raise RuntimeError(f"{lost} selected rows have no fate: they are in no pair and not kept unpaired")
    not_selected = pa.table(
        {"id": [None], "fate": ["not selected"], "detail": [NOT_SELECTED_DETAIL], "output_id": [None]},
        schema=fates.schema,
    )
    fates = pa.concat_tables([fates, not_selected])
    chosen = fates.take(pc.if_else(selected, where, len(fates) - 1))
    parts = [
        _listed([(d.id, d.source_index, "dropped", f"{d.reason} {d.detail}".strip(), None) for d in report.dropped]),
        _listed([(d.id, d.source_index, "prefiltered", d.detail, None) for d in prefiltered]),
        pa.table(
            {
                "id": valid["id"],
                "source_index": valid["source_index"],
                **{name: chosen[name] for name in ("fate", "detail", "output_id")},
            }
        ).cast(_ACCOUNTING_SCHEMA),
    ]
    table = pa.concat_tables(parts)
    # In input order; Arrow's sort is stable, as ``sorted`` was.
    ordered = table.take(pc.sort_indices(table["source_index"]))
    return Dataset(ordered, info=DatasetInfo(features=ACCOUNTING_FEATURES), fingerprint=_unhashed())


def _work_file() -> str:
    """A new file in this process's assembly folder (removed at exit), for a map, an order or a flattening:
    in the datasets cache, under fingerprints new every run, each run would leave its final rows behind."""
    global _WORK_FOLDER
    if _WORK_FOLDER is None:
        _WORK_FOLDER = Path(tempfile.mkdtemp(prefix="mergeit-assembly-"))
        atexit.register(shutil.rmtree, _WORK_FOLDER, ignore_errors=True)
    return str(_WORK_FOLDER / f"{uuid.uuid4().hex}.arrow")


_WORK_FOLDER: Path | None = None


def _unhashed() -> str:
    """A fingerprint for a Dataset made of a table or of indices: without one, datasets hashes them by
    pickling, a Python copy of every row."""
    return generate_random_fingerprint()


def _listed(rows: list[tuple]) -> pa.Table:
    """Accounting rows given as tuples (the drops the load report lists), as a table."""
    columns = list(zip(*rows, strict=True)) if rows else [[] for _ in ACCOUNTING_FEATURES]
    return pa.table(dict(zip(ACCOUNTING_FEATURES, columns, strict=True)), schema=_ACCOUNTING_SCHEMA)
