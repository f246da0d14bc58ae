"""The cluster reads the input: a parquet file is read by Ray tasks, one row group each, and every record is
checked there with the datasets engine's own check (``check_candidate``). The driver reads the file's footer
(row groups, columns, the first record), and gets back only what accounting needs: the counts, the drops and
the first type problems. Exact duplicates and repeated ids are found by ``groupby`` on a narrow
(fingerprint, id, position) view, so no text and no embedding leaves the cluster.

Other sources (JSON, a Hub name, an in-memory ``Dataset``, a run's output folder) are read on the driver by
``load_rows`` and handed to Ray as they are (``ValidRows.from_dataset``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datasets import Dataset

from mergeit_hf.errors import InputError
from mergeit_hf.inputs.loading import (
    EMBEDDING_COLUMN,
    ROW_FEATURES,
    CheckedRow,
    InputFormat,
    check_candidate,
    detect_format,
    first_turn_keys,
    load_rows,
    shape_candidates,
    type_problems_error,
)
from mergeit_hf.inputs.report import DroppedRow, LoadReport

#: What a checked record carries besides its row: the content fingerprint (for duplicates), what a
#: duplicate of it is called, and for a record that is not a row, why (null for a row).
FINGERPRINT, WHAT, REASON, DETAIL, PROBLEMS = "_fingerprint", "_what", "_drop_reason", "_drop_detail", "_problems"
#: A row's place in input order, unique (a seed task's instances share their record's ``source_index``):
#: every step of the Ray engine orders rows by it.
ROW = "_row"
#: The reason of a marker row standing for one row group's type problems (the run stops on them).
TYPE_PROBLEMS = "_type_problems"
_LISTED_PROBLEMS = 5
_OUTPUT_ROWS = 10_000  # records checked at a time inside a row group: the worker's memory stays bounded


@dataclass(frozen=True)
class ValidRows:
    """The valid rows as a Ray dataset (``ROW_FEATURES``, plus the input's ``embedding`` if it has one), and
    how many there are."""

    data: Any  # ray.data.Dataset
    n_rows: int
    given_embeddings: bool

    @classmethod
    def from_dataset(cls, rows: Dataset) -> ValidRows:
        """Rows ``load_rows`` read on the driver, put into the cluster's object store."""
        import ray.data

        rows = rows.add_column(ROW, np.arange(len(rows), dtype=np.int64))
        for name, default in (("system", ""), ("multi_turn", False)):  # a Dataset built by hand may lack them
            if name not in rows.column_names:
                rows = rows.add_column(name, [default] * len(rows))
        return cls(ray.data.from_huggingface(rows), len(rows), EMBEDDING_COLUMN in rows.column_names)


def cluster_readable(source: object) -> Path | None:
    """The parquet file the cluster reads itself, or None for a source the driver reads."""
    if isinstance(source, str | Path) and Path(source).suffix == ".parquet" and Path(source).is_file():
        return Path(source)
    return None


def read_on_cluster(
    path: Path, input_format: InputFormat = "auto", column_map: Mapping[str, str] | None = None, id_column: str = "id"
) -> tuple[ValidRows, LoadReport]:
    """Validated rows of a parquet file, read and checked by the cluster; the same rows and report as
    ``load_rows`` (drops in input order). Seed tasks (several rows a record) are read by ``load_rows``."""
    import ray.data

    footer = _open(path)
    columns = footer.schema_arrow.names
    first = next(footer.iter_batches(batch_size=1), pa.RecordBatch.from_pylist([])).to_pylist()
    fmt = detect_format(columns, input_format, column_map, first[0] if first else {})
    if fmt == "seed_tasks":
        rows, report = load_rows(path, input_format=input_format, column_map=column_map, id_column=id_column)
        return ValidRows.from_dataset(rows), report
    report = LoadReport(source=str(path), input_format=fmt, records_read=footer.metadata.num_rows)
    next(iter(shape_candidates([], columns, fmt, column_map, id_column, report)), None)  # a missing column: now
    shape, shape_map = _batch_shape(fmt, column_map, first[0] if first else {})
    given = fmt == "alpaca" and EMBEDDING_COLUMN in columns
    offsets = np.cumsum([0] + [footer.metadata.row_group(g).num_rows for g in range(footer.num_row_groups)])
    fragments = [{"row_group": g, "offset": int(offsets[g])} for g in range(footer.num_row_groups)]
    check = _CheckRecords(str(path.resolve()), columns, shape, shape_map, id_column, given)
    checked = (
        ray.data.from_items(fragments, override_num_blocks=max(1, len(fragments)))
        .map_batches(check, batch_size=1, batch_format="pyarrow")
        .materialize()
    )
    report.rows_extracted = checked.count()
    not_rows = _gathered(checked.map_batches(_not_rows, batch_format="pyarrow"))
    _raise_type_problems(not_rows, str(path))
    kept = checked.map_batches(_rows, batch_format="pyarrow")
    duplicates = _duplicates(kept)
    report.dropped = sorted(_drops(not_rows) + duplicates, key=lambda drop: drop.source_index)
    if duplicates:
        kept = kept.map_batches(_Without(np.asarray([d.source_index for d in duplicates])), batch_format="pyarrow")
    if id_column in columns:
        _refuse_repeated_ids(kept, str(path))
    kept = kept.drop_columns([FINGERPRINT, WHAT, REASON, DETAIL, PROBLEMS]).map_batches(
        _numbered, batch_format="pyarrow"
    )
    kept = kept.materialize()
    if report.rows_valid == 0 and report.dropped and fmt in ("messages", "sharegpt"):
        first_drop = report.dropped[0]
        raise InputError(
            f"{report.source}: none of the {report.records_read} conversations can be used; the first, record "
            f"{first_drop.source_index}: {first_drop.reason} ({first_drop.detail})"
        )
    return ValidRows(kept, report.rows_valid, given), report


def _batch_shape(fmt: str, column_map: Mapping[str, str] | None, first: dict) -> tuple[str, dict[str, str]]:
    """The shape every batch is read in, decided once from the file's first record as ``load_rows`` does: a
    ``messages`` column holding ShareGPT's from / value turns is read as ShareGPT."""
    mapping = dict(column_map or {})
    column = mapping.get("messages") or "messages"
    if fmt == "messages" and first_turn_keys(first.get(column)) >= {"from", "value"}:
        return "sharegpt", {**mapping, "messages": column}
    return fmt, mapping


def _numbered(batch: pa.Table) -> pa.Table:
    return batch.append_column(ROW, batch["source_index"])  # one row a record: its index is its place


def _open(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise InputError(f"{path}: not a readable parquet file ({exc})") from None


@dataclass(frozen=True)
class _CheckRecords:
    """In a Ray task: one row group read and every record checked, in slices of ``_OUTPUT_ROWS``."""

    path: str
    columns: list[str]
    fmt: str
    column_map: dict[str, str]
    id_column: str
    given_embeddings: bool

    def __call__(self, fragment: pa.Table) -> Iterator[pa.Table]:
        row_group, offset = fragment["row_group"][0].as_py(), fragment["offset"][0].as_py()
        for batch in pq.ParquetFile(self.path).iter_batches(_OUTPUT_ROWS, row_groups=[row_group]):
            yield self._checked(batch, offset)
            offset += batch.num_rows

    def _checked(self, batch: pa.RecordBatch, offset: int) -> pa.Table:
        report = LoadReport(source=self.path, input_format=self.fmt)
        records = batch.select([n for n in batch.schema.names if n != EMBEDDING_COLUMN]).to_pylist()
        out: dict[str, list] = {name: [] for name in (*ROW_FEATURES, FINGERPRINT, WHAT, REASON, DETAIL, PROBLEMS)}
        at: list[int] = []  # each output row's record, inside this batch
        problems: list[str] = []
        problem_at = None
        for index, given_id, values in shape_candidates(
            records, self.columns, self.fmt, self.column_map, self.id_column, report
        ):
            checked = check_candidate(offset + index, given_id, values)
            if isinstance(checked, list):
                problems += checked
                problem_at = offset + index if problem_at is None else problem_at
                continue
            _append(out, checked)
            at.append(index)
        for drop in report.dropped:  # records that hold no row (a conversation that cannot be used)
            _append(out, replace(drop, source_index=offset + drop.source_index))
            at.append(drop.source_index)
        if problems:
            _append(out, DroppedRow(problem_at or 0, TYPE_PROBLEMS, "\n".join(problems[:_LISTED_PROBLEMS])))
            out[PROBLEMS][-1] = len(problems)
            at.append(0)
        table = pa.table(out, schema=_CHECKED_SCHEMA)
        if self.given_embeddings:
            table = table.append_column(EMBEDDING_COLUMN, batch.column(EMBEDDING_COLUMN).take(pa.array(at, pa.int64())))
        return table


_CHECKED_SCHEMA = pa.schema(
    [
        *ROW_FEATURES.arrow_schema,
        pa.field(FINGERPRINT, pa.string()),
        pa.field(WHAT, pa.string()),
        pa.field(REASON, pa.string()),
        pa.field(DETAIL, pa.string()),
        pa.field(PROBLEMS, pa.int64()),
    ]
)


def _append(out: dict[str, list], checked: CheckedRow | DroppedRow) -> None:
    if isinstance(checked, CheckedRow):
        row = {**checked.row, FINGERPRINT: checked.fingerprint, WHAT: checked.what, REASON: None, DETAIL: None}
    else:
        row = {
            **{name: "" for name in ("instruction", "input", "output", "system")},
            "id": checked.id,
            "source_index": checked.source_index,
            "messages": [],
            "multi_turn": False,
            FINGERPRINT: None,
            WHAT: None,
            REASON: checked.reason,
            DETAIL: checked.detail,
        }
    for name in out:
        out[name].append(row.get(name, 0))


def _not_rows(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_valid(batch[REASON])).select(["source_index", "id", REASON, DETAIL, PROBLEMS])


def _rows(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_null(batch[REASON]))


def _gathered(data: Any) -> pa.Table:
    """A small Ray dataset (drops, duplicates) brought to the driver as one table."""
    tables = [batch for batch in data.iter_batches(batch_format="pyarrow", batch_size=None) if batch.num_rows]
    return pa.concat_tables(tables) if tables else pa.table({})


def _raise_type_problems(not_rows: pa.Table, source: str) -> None:
    if not not_rows.num_rows:
        return
    marked = not_rows.filter(pc.equal(not_rows[REASON], TYPE_PROBLEMS)).sort_by("source_index")
    if marked.num_rows:
        listed = [line for detail in marked[DETAIL].to_pylist() for line in detail.split("\n")]
        raise type_problems_error(source, listed, int(pc.sum(marked[PROBLEMS]).as_py()))


def _drops(not_rows: pa.Table) -> list[DroppedRow]:
    if not not_rows.num_rows:
        return []
    return [
        DroppedRow(row["source_index"], row[REASON], row[DETAIL] or "", row["id"])
        for row in not_rows.to_pylist()
        if row[REASON] != TYPE_PROBLEMS
    ]


def _duplicates_in_group(group: pa.Table) -> pa.Table:
    """Every row of one fingerprint but the first in input order, as an exact duplicate of that first."""
    group = group.sort_by("source_index")
    first = group["id"][0].as_py()
    later = group.slice(1)
    details = [f"same {what} as row {first}" for what in later[WHAT].to_pylist()]
    return pa.table({"source_index": later["source_index"], "id": later["id"], DETAIL: pa.array(details, pa.string())})


def _duplicates(kept: Any) -> list[DroppedRow]:
    narrow = kept.select_columns([FINGERPRINT, WHAT, "source_index", "id"])
    found = _gathered(narrow.groupby(FINGERPRINT).map_groups(_duplicates_in_group, batch_format="pyarrow"))
    if not found.num_rows:
        return []
    return [DroppedRow(row["source_index"], "exact duplicate", row[DETAIL], row["id"]) for row in found.to_pylist()]


@dataclass(frozen=True)
class _Without:
    positions: np.ndarray  # source indices of the rows to leave out (the duplicates: accounting, not rows)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return batch.filter(pa.array(~np.isin(batch["source_index"].to_numpy(), self.positions)))


def _second_of_id(group: pa.Table) -> pa.Table:
    """An id held by two rows or more: the record of its second, where the datasets engine stops."""
    ordered = group.sort_by("source_index")
    return ordered.slice(1, 1) if ordered.num_rows > 1 else ordered.slice(0, 0)


def _refuse_repeated_ids(kept: Any, source: str) -> None:
    narrow = kept.select_columns(["id", "source_index"])
    repeated = _gathered(narrow.groupby("id").map_groups(_second_of_id, batch_format="pyarrow"))
    if repeated.num_rows:
        first = repeated.sort_by("source_index").to_pylist()[0]
        raise InputError(f"{source}: id {first['id']!r} appears more than once (record {first['source_index']})")
