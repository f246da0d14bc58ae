"""Read instruction data into validated rows, each with a stable id.

Sources: JSON (array), JSON lines, parquet, a run's output folder, a Hub dataset name, or a
``datasets.Dataset``. Shapes: Alpaca rows (``instruction``/``input``/``output``, other names through
``column_map``), conversations (``messages`` of role/content, as OpenAI and TRL write them, and ShareGPT's
``conversations``: one conversation is one row, ``inputs.conversations``) and Alpaca seed tasks (each
instance becomes a row). Every record read is either a row of the result or a counted, explained drop.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from datasets import Dataset, Features, List, Sequence, Value

from mergeit_hf.errors import InputError
from mergeit_hf.inputs.batches import batch_rows
from mergeit_hf.inputs.conversations import MESSAGES, SHAREGPT, conversation_candidates
from mergeit_hf.inputs.files import read_source
from mergeit_hf.inputs.report import DroppedRow, LoadReport, content_id

InputFormat = Literal["auto", "alpaca", "messages", "sharegpt", "seed_tasks"]
ROW_FIELDS = ("instruction", "input", "output")
#: A conversation's turns, roles normalised to system / user / assistant.
MESSAGES_FEATURE = List({"role": Value("string"), "content": Value("string")})
ROW_FEATURES = Features(
    {
        "id": Value("string"),
        "instruction": Value("string"),
        "input": Value("string"),
        "output": Value("string"),
        "source_index": Value("int64"),
        # Conversations: the system prompt ("" if none), every turn as it came, and whether it has several
        # user turns (then it is selected or not, whole, and never merged). Alpaca rows: "", [], False.
        "system": Value("string"),
        "messages": MESSAGES_FEATURE,
        "multi_turn": Value("bool"),
    }
)
_CONVERSATION_SHAPES = {"messages": MESSAGES, "sharegpt": SHAREGPT}
_CONVERSATION_COLUMNS = {"messages": "messages", "sharegpt": "conversations"}
#: An input column of this name holds embeddings computed elsewhere (a GPU box, a TEI server): kept.
EMBEDDING_COLUMN = "embedding"
_MAX_LISTED_PROBLEMS = 5
_READ_BATCH_ROWS = 10_000


def load_rows(
    source: str | Path | Dataset,
    *,
    input_format: InputFormat = "auto",
    column_map: Mapping[str, str] | None = None,
    id_column: str = "id",
    split: str = "train",
) -> tuple[Dataset, LoadReport]:
    """Read ``source`` into a Dataset with columns id, instruction, input, output, source_index.

    ``column_map`` maps our names to yours, e.g. ``{"instruction": "prompt", "output": "response"}``.
    Rows with an empty instruction or output, and exact duplicates, are dropped and counted in the
    report; a missing column, a non-string value or an unreadable file raises ``InputError``.
    """
    records, columns, report = read_source(source, split)
    fmt = detect_format(columns, input_format, column_map, _first(records))
    report.input_format = fmt
    candidates = shape_candidates(records, columns, fmt, column_map, id_column, report)
    # Straight to Arrow with the schema known: Dataset.from_dict would encode a million rows value by value.
    rows = Dataset(pa.Table.from_pydict(_validate(candidates, report), schema=ROW_FEATURES.arrow_schema))
    if len(rows) == 0 and report.dropped and fmt in _CONVERSATION_SHAPES:
        first = report.dropped[0]
        raise InputError(
            f"{report.source}: none of the {report.records_read} conversations can be used; the first, record "
            f"{first.source_index}: {first.reason} ({first.detail})"
        )
    if fmt == "alpaca" and EMBEDDING_COLUMN in columns:
        rows = _with_given_embeddings(records, rows, report.source)
    return rows, report


def _with_given_embeddings(records: Iterable[dict], rows: Dataset, source: str) -> Dataset:
    """The input's own ``embedding`` of every kept row, checked: one length, numbers, all finite.

    From a Dataset (a file read through Arrow, or the Hub) the column stays Arrow: checked in numpy
    chunks and joined to the rows without becoming Python objects (a million 384-d rows would take 20 GB).
    """
    indices = rows.data.column("source_index").to_numpy()
    if isinstance(records, Dataset):
        return _join_arrow_embeddings(records, rows, indices, source)
    values = [records[i].get(EMBEDDING_COLUMN) for i in indices]  # type: ignore[index]
    vectors = checked_vectors(values, source)
    return rows.add_column(EMBEDDING_COLUMN, list(vectors), feature=Sequence(Value("float32")))


def checked_vectors(values: Any, source: str) -> np.ndarray:
    try:
        vectors = np.asarray(values, dtype=np.float32)
    except (ValueError, TypeError):
        lengths = sorted({len(v) if isinstance(v, list | tuple | np.ndarray) else -1 for v in values})
        raise InputError(
            f"{source}: the {EMBEDDING_COLUMN!r} column must hold one list of numbers of one length per row; "
            f"found lengths {lengths[:5]} (-1: not a list)"
        ) from None
    if vectors.ndim != 2 or not np.isfinite(vectors).all():
        raise InputError(f"{source}: the {EMBEDDING_COLUMN!r} column holds empty, NaN or infinite vectors")
    return vectors


def _join_arrow_embeddings(records: Dataset, rows: Dataset, indices: np.ndarray, source: str) -> Dataset:
    from datasets import concatenate_datasets

    embeddings = records.select_columns([EMBEDDING_COLUMN])
    if not np.array_equal(indices, np.arange(len(records))):  # rows were dropped: keep the embeddings of the rest
        embeddings = embeddings.select(indices).flatten_indices()
    width = None
    for chunk in embeddings.with_format("numpy").iter(batch_size=_READ_BATCH_ROWS):
        vectors = checked_vectors(list(chunk[EMBEDDING_COLUMN]), source)
        if width is not None and vectors.shape[1] != width:
            raise InputError(
                f"{source}: the {EMBEDDING_COLUMN!r} column must hold one list of numbers of one length per row; "
                f"found lengths {sorted({width, vectors.shape[1]})}"
            )
        width = vectors.shape[1]
    if embeddings.features[EMBEDDING_COLUMN] != Sequence(Value("float32")):
        embeddings = embeddings.cast_column(EMBEDDING_COLUMN, Sequence(Value("float32")))
    return concatenate_datasets([rows, embeddings], axis=1)


# -- shapes -------------------------------------------------------------------------------------------


def shape_candidates(
    records: Iterable[dict],
    columns: list[str],
    fmt: str,
    column_map: Mapping[str, str] | None,
    id_column: str,
    report: LoadReport,
) -> Iterator[tuple[int, str | None, dict[str, Any]]]:
    """(record index, given id, values) of every row the records hold in shape ``fmt``; a record that holds
    none (a conversation that cannot be used, a seed task without instances) is counted in ``report``."""
    if fmt == "alpaca":
        return _alpaca_rows(records, _resolve_column_map(columns, column_map, report.source), id_column, report)
    if fmt in _CONVERSATION_SHAPES:
        return _conversation_rows(records, columns, fmt, column_map, id_column, report)
    return _seed_task_rows(records, report)


def detect_format(
    columns: list[str], requested: InputFormat, column_map: Mapping[str, str] | None, first: Mapping[str, Any]
) -> str:
    if requested != "auto":
        return requested
    if (column_map or {}).get("messages"):
        return "messages"
    # Rows this loader made hold an empty ``messages`` beside their instruction: those are Alpaca rows.
    if "messages" in columns and not ("instruction" in columns and first.get("messages") == []):
        return "messages"
    if "conversations" in columns:
        return "sharegpt"
    if "instances" in columns:
        return "seed_tasks"
    return "alpaca"


def _first(records: Iterable[dict]) -> Mapping[str, Any]:
    if isinstance(records, Dataset):
        return records[0] if len(records) else {}
    if isinstance(records, list):
        return records[0] if records and isinstance(records[0], dict) else {}
    return {}


def _resolve_column_map(columns: list[str], column_map: Mapping[str, str] | None, source: str) -> dict:
    unknown = sorted(set(column_map or {}) - set(ROW_FIELDS))
    if unknown:
        raise InputError(f"column_map keys must be among {[*ROW_FIELDS, 'messages']}; got {unknown}")
    mapping = {name: (column_map or {}).get(name, name) for name in ROW_FIELDS}
    required = [n for n in ROW_FIELDS if n != "input" or (column_map and "input" in column_map)]
    missing = [mapping[name] for name in required if mapping[name] not in columns]
    if missing:
        raise InputError(
            f"{source}: column(s) {missing} not found; columns present: {columns}. "
            "Pass column_map (CLI: --column instruction=NAME) to name yours."
        )
    if mapping["input"] not in columns:
        mapping["input"] = None  # the whole source has no input column: every input is empty
    return mapping


def _records(records: Iterable[dict], columns: list[str]) -> Iterator[dict]:
    """Each record with only ``columns``: a Dataset is read in Arrow batches of just those columns, so an
    embedding column (384 floats a row) is never turned into Python objects here."""
    if not isinstance(records, Dataset):
        yield from records
        return
    present = [name for name in dict.fromkeys(columns) if name in records.column_names]
    for batch in records.select_columns(present).iter(batch_size=_READ_BATCH_ROWS):
        yield from batch_rows(batch)


def _alpaca_rows(records: Iterable[dict], mapping: dict, id_column: str, report: LoadReport) -> Iterator:
    needed = [column for column in mapping.values() if column] + [id_column]
    for index, record in enumerate(_records(records, needed)):
        values = {name: record.get(column) if column else "" for name, column in mapping.items()}
        given_id = record.get(id_column)
        yield index, (None if given_id is None else str(given_id)), values


def _conversation_rows(
    records: Iterable[dict],
    columns: list[str],
    fmt: str,
    column_map: Mapping[str, str] | None,
    id_column: str,
    report: LoadReport,
) -> Iterator:
    column = (column_map or {}).get("messages") or _CONVERSATION_COLUMNS[fmt]
    if column not in columns:
        raise InputError(
            f"{report.source}: no {column!r} column of conversations; columns present: {columns}. "
            "Name yours with column_map (CLI: --column messages=NAME)."
        )

    def dropped(index: int, reason: str, detail: str, row_id: str | None) -> None:
        report.rows_extracted += 1
        report.dropped.append(DroppedRow(index, reason, detail, row_id))

    shape = _CONVERSATION_SHAPES[fmt]
    if fmt == "messages" and first_turn_keys(_first(records).get(column)) >= {"from", "value"}:
        shape = SHAREGPT  # a column named by --column messages=NAME that holds ShareGPT's from / value turns
    records = _records(records, [column, id_column])
    yield from conversation_candidates(records, column, shape, id_column, dropped)


def first_turn_keys(turns: Any) -> set[str]:
    if isinstance(turns, list) and turns and isinstance(turns[0], Mapping):
        return set(turns[0])
    return set()


def _seed_task_rows(records: Iterable[dict], report: LoadReport) -> Iterator:
    for index, record in enumerate(_records(records, ["id", "instruction", "instances"])):
        task_id = str(record.get("id", index))
        instances = record.get("instances") or []
        if not instances:
            report.rows_extracted += 1
            report.dropped.append(DroppedRow(index, "seed task without instances", "", task_id))
        for number, instance in enumerate(instances):
            values = {
                "instruction": record.get("instruction"),
                **{k: instance.get(k) for k in ("input", "output")},
            }
            yield index, f"{task_id}#{number}", values


# -- validation ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckedRow:
    """A candidate that passed the per-record checks: its row (``ROW_FEATURES``), its content fingerprint, and
    what a duplicate of it is called ("conversation" or "instruction, input and output")."""

    row: dict[str, Any]
    fingerprint: str
    what: str


def check_candidate(
    source_index: int, given_id: str | None, values: dict[str, Any]
) -> CheckedRow | DroppedRow | list[str]:
    """One candidate on its own, as every engine checks it: its type problems (a list, the run stops), a drop
    (empty instruction or output), or the row. Duplicates and repeated ids need every row: the caller's."""
    text, problems = {}, []
    for name in ROW_FIELDS:
        value = values.get(name)
        if value is not None and not isinstance(value, str):
            problems.append(f"record {source_index} field {name!r} holds {type(value).__name__} {value!r:.40}")
        text[name] = value.strip() if isinstance(value, str) else ""
    if problems:
        return problems
    conversation = {
        "system": values.get("system", ""),
        "messages": values.get("messages", []),
        "multi_turn": values.get("multi_turn", False),
    }
    fingerprint = _fingerprint(text, conversation["messages"])
    row_id = given_id or fingerprint
    for name in ("instruction", "output"):
        if not text[name]:
            return DroppedRow(source_index, f"empty {name}", "", row_id)
    row = {"id": row_id, **text, "source_index": source_index, **conversation}
    return CheckedRow(row, fingerprint, "conversation" if conversation["messages"] else "instruction, input and output")


def type_problems_error(source: str, problems: list[str], count: int) -> InputError:
    shown = "; ".join(problems[:_MAX_LISTED_PROBLEMS])
    return InputError(
        f"{source}: {count} value(s) are not strings ({shown}). "
        "instruction, input and output must be text; convert or map other columns."
    )


def _validate(candidates: Iterator, report: LoadReport) -> dict[str, list]:
    rows: dict[str, list] = {name: [] for name in ROW_FEATURES}
    first_seen: dict[str, str] = {}  # content fingerprint -> id of the row kept
    seen_ids: set[str] = set()
    type_problems: list[str] = []
    for source_index, given_id, values in candidates:
        report.rows_extracted += 1
        checked = check_candidate(source_index, given_id, values)
        if isinstance(checked, list):
            type_problems += checked
        if type_problems:
            continue
        if isinstance(checked, DroppedRow):
            report.dropped.append(checked)
            continue
        # Content first: a record repeated whole, id and all, is a duplicate to drop, not a clash of ids.
        row_id = checked.row["id"]
        if checked.fingerprint in first_seen:
            detail = f"same {checked.what} as row {first_seen[checked.fingerprint]}"
            report.dropped.append(DroppedRow(source_index, "exact duplicate", detail, row_id))
            continue
        first_seen[checked.fingerprint] = row_id
        if given_id is not None and given_id in seen_ids:
            raise InputError(f"{report.source}: id {given_id!r} appears more than once (record {source_index})")
        seen_ids.add(row_id)
        for name, value in checked.row.items():
            rows[name].append(value)
    if type_problems:
        raise type_problems_error(report.source, type_problems, len(type_problems))
    return rows


def _fingerprint(text: dict[str, str], messages: list[dict[str, str]]) -> str:
    """A conversation's identity is every turn (two that share a first exchange differ later); a row's is
    its instruction, input and output."""
    if messages:
        return content_id(*(f"{turn['role']}:{turn['content']}" for turn in messages))
    return content_id(text["instruction"], text["input"], text["output"])
