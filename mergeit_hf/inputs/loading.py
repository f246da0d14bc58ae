"""Read instruction data into validated Alpaca-shaped rows, each with a stable id.

Sources: JSON (array), JSON lines, parquet, a Hub dataset name, or a ``datasets.Dataset``.
Shapes: Alpaca rows (``instruction``/``input``/``output``, other names through ``column_map``),
ShareGPT conversations (each human→assistant turn becomes a row) and Alpaca seed tasks (each instance
becomes a row). Every record read is either a row of the result or a counted, explained drop.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from datasets import Dataset, Features, Sequence, Value

from mergeit_hf.errors import InputError
from mergeit_hf.progress import datasets_bars_off, datasets_errors_expected

InputFormat = Literal["auto", "alpaca", "sharegpt", "seed_tasks"]
ROW_FIELDS = ("instruction", "input", "output")
ROW_FEATURES = Features(
    {
        "id": Value("string"),
        "instruction": Value("string"),
        "input": Value("string"),
        "output": Value("string"),
        "source_index": Value("int64"),
    }
)
#: An input column of this name holds embeddings computed elsewhere (a GPU box, a TEI server): kept.
EMBEDDING_COLUMN = "embedding"
_HUMAN_ROLES = {"human", "user"}
_ASSISTANT_ROLES = {"gpt", "assistant", "chatgpt", "bard", "bing"}
_MAX_LISTED_PROBLEMS = 5
_READ_BATCH_ROWS = 10_000


@dataclass(frozen=True)
class DroppedRow:
    """An input row that is not in the output, and why."""

    source_index: int
    reason: str
    detail: str = ""
    id: str | None = None


@dataclass
class LoadReport:
    """What reading one source found: counts that explain every input record."""

    source: str
    input_format: str
    records_read: int = 0
    rows_extracted: int = 0
    dropped: list[DroppedRow] = field(default_factory=list)
    unreadable_bytes: int = 0
    unreadable_detail: str = ""

    @property
    def rows_valid(self) -> int:
        return self.rows_extracted - len(self.dropped)

    @property
    def drop_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(d.reason for d in self.dropped).items()))

    @property
    def complete(self) -> bool:
        """False when part of the source could not be read at all."""
        return self.unreadable_bytes == 0 and not self.unreadable_detail

    def summary(self) -> str:
        lines = [
            f"{self.source}: {self.records_read} records read as {self.input_format}, "
            f"{self.rows_extracted} rows, {self.rows_valid} valid"
        ]
        lines += [f"  dropped {count}: {reason}" for reason, count in self.drop_counts.items()]
        if not self.complete:
            lines.append(f"  NOT READ: {self.unreadable_bytes} bytes ({self.unreadable_detail})")
        return "\n".join(lines)


def content_id(instruction: str, input_text: str, output: str) -> str:
    """Stable id of a row without one: a hash of its content, identical across runs and machines."""
    payload = "\x1f".join((instruction, input_text, output)).encode("utf-8")
    return hashlib.sha256(payload).hexdigest()[:16]


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
    records, columns, report = _read_source(source, split)
    fmt = _detect_format(columns, input_format)
    report.input_format = fmt
    if fmt == "alpaca":
        mapping = _resolve_column_map(columns, column_map, report.source)
        candidates = _alpaca_rows(records, mapping, id_column, report)
    elif fmt == "sharegpt":
        candidates = _sharegpt_rows(records, report)
    else:
        candidates = _seed_task_rows(records, report)
    # Straight to Arrow with the schema known: Dataset.from_dict would encode a million rows value by value.
    rows = Dataset(pa.Table.from_pydict(_validate(candidates, report), schema=ROW_FEATURES.arrow_schema))
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
    vectors = _checked_vectors(values, source)
    return rows.add_column(EMBEDDING_COLUMN, list(vectors), feature=Sequence(Value("float32")))


def _checked_vectors(values: Any, source: str) -> np.ndarray:
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
        vectors = _checked_vectors(list(chunk[EMBEDDING_COLUMN]), source)
        if width is not None and vectors.shape[1] != width:
            raise InputError(
                f"{source}: the {EMBEDDING_COLUMN!r} column must hold one list of numbers of one length per row; "
                f"found lengths {sorted({width, vectors.shape[1]})}"
            )
        width = vectors.shape[1]
    if embeddings.features[EMBEDDING_COLUMN] != Sequence(Value("float32")):
        embeddings = embeddings.cast_column(EMBEDDING_COLUMN, Sequence(Value("float32")))
    return concatenate_datasets([rows, embeddings], axis=1)


# -- reading ------------------------------------------------------------------------------------------


def _read_source(source: str | Path | Dataset, split: str) -> tuple[Iterable[dict], list[str], LoadReport]:
    if isinstance(source, Dataset):
        report = LoadReport(source="<Dataset>", input_format="auto", records_read=len(source))
        return source, list(source.column_names), report
    path = Path(source)
    if path.is_file():
        records, report = _read_file(path)
        columns = sorted(records.column_names) if isinstance(records, Dataset) else _keys(records)
        report.records_read = len(records)
        return records, columns, report
    if path.suffix in {".json", ".jsonl", ".parquet"} or path.exists():
        raise InputError(f"input file not found: {path}")
    return _read_hub(str(source), split)


def _keys(records: list[dict]) -> list[str]:
    return sorted({key for record in records for key in record})


def _read_file(path: Path) -> tuple[Dataset | list[dict], LoadReport]:
    """Parquet and JSON lines become a memory-mapped Arrow dataset (datasets' builders, read in blocks, so a
    file larger than memory loads); a JSON array is read whole, to recover the records of a cut-off file."""
    report = LoadReport(source=str(path), input_format="auto")
    if path.suffix == ".parquet":
        try:
            return _built(path, "parquet"), report
        except Exception as exc:  # datasets wraps Arrow's error; the cause says what is wrong with the file
            cause = exc.__cause__ or exc
            raise InputError(f"{path} cannot be read as parquet: {type(cause).__name__}: {cause}") from exc
    if path.suffix == ".jsonl" or not _starts_with(path, "["):
        return _read_json_lines_file(path, report), report
    records = _read_json_array(path.read_text(encoding="utf-8"), report)
    _check_objects(records, path)
    return records, report


def _starts_with(path: Path, character: str) -> bool:
    with path.open("rb") as handle:
        head = handle.read(4096).lstrip()
    return head[:1] == character.encode()


def _built(path: Path, builder: str) -> Dataset:
    """The file through datasets' own builder, cached as Arrow beside datasets' other caches."""
    from datasets import load_dataset

    with datasets_bars_off():  # a bar per load would repeat on every rerun of the same file
        return load_dataset(builder, data_files=str(path), split="train")


def _read_json_lines_file(path: Path, report: LoadReport) -> Dataset | list[dict]:
    """JSON lines through datasets' JSON builder; broken lines are left out and counted first (in one
    streamed pass that writes the readable lines to a copy), as is a record that is not an object."""
    try:
        with datasets_errors_expected():  # the broken lines are counted and reported below, not logged twice
            return _built(path, "json")
    except Exception:  # a broken line, a record that is not an object, or types Arrow cannot unify
        pass
    with tempfile.TemporaryDirectory(prefix="mergeit-jsonl-") as folder:
        readable = Path(folder) / path.name
        _copy_readable_lines(path, readable, report)
        try:
            return _built(readable, "json")
        except Exception:  # types Arrow cannot unify (e.g. ids that are numbers and text): read into memory
            records = [json.loads(line) for line in readable.read_text(encoding="utf-8").splitlines()]
            return records


def _copy_readable_lines(path: Path, readable: Path, report: LoadReport) -> None:
    bad_lines: list[int] = []
    with path.open(encoding="utf-8") as lines, readable.open("w", encoding="utf-8") as out:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                bad_lines.append(number)
                report.unreadable_bytes += len(line.rstrip("\n").encode("utf-8"))
                continue
            if not isinstance(record, dict):
                raise InputError(f"{path}: line {number} is a JSON {type(record).__name__}, expected an object")
            out.write(line if line.endswith("\n") else line + "\n")
    if bad_lines:
        shown = ", ".join(map(str, bad_lines[:_MAX_LISTED_PROBLEMS]))
        report.unreadable_detail = f"{len(bad_lines)} line(s) are not valid JSON (line {shown})"


def _check_objects(records: list[Any], path: Path) -> None:
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise InputError(f"{path}: record {index} is a JSON {type(record).__name__}, expected an object")


def _read_json_array(text: str, report: LoadReport) -> list[Any]:
    try:
        records = json.loads(text)
    except json.JSONDecodeError:
        return _recover_json_array(text, report)
    if not isinstance(records, list):
        raise InputError(f"{report.source}: expected a JSON array of records")
    return records


def _recover_json_array(text: str, report: LoadReport) -> list[Any]:
    """Keep every complete record of a JSON array that is cut off or broken part-way."""
    decoder = json.JSONDecoder()
    position = text.index("[") + 1
    records: list[Any] = []
    while True:
        position = _skip_whitespace(text, position)
        if position < len(text) and text[position] == "]":
            break
        try:
            record, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as exc:
            unread = text[position:]
            report.unreadable_bytes = len(unread.encode("utf-8"))
            report.unreadable_detail = (
                f"JSON array broken after record {len(records)} at character {position}: {exc.msg}; "
                f"kept the {len(records)} complete records before it"
            )
            return records
        records.append(record)
        position = _skip_whitespace(text, position)
        if position < len(text) and text[position] == ",":
            position += 1
    return records


def _skip_whitespace(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def _read_hub(name: str, split: str) -> tuple[Iterable[dict], list[str], LoadReport]:
    from datasets import load_dataset

    try:
        dataset = load_dataset(name, split=split)
    except Exception as exc:  # datasets raises many types here; the message says which source failed
        raise InputError(f"could not load {name!r} as a local file or a Hub dataset: {exc}") from exc
    report = LoadReport(source=name, input_format="auto", records_read=len(dataset))
    return dataset, list(dataset.column_names), report


# -- shapes -------------------------------------------------------------------------------------------


def _detect_format(columns: list[str], requested: InputFormat) -> str:
    if requested != "auto":
        return requested
    if "conversations" in columns:
        return "sharegpt"
    if "instances" in columns:
        return "seed_tasks"
    return "alpaca"


def _resolve_column_map(columns: list[str], column_map: Mapping[str, str] | None, source: str) -> dict:
    unknown = sorted(set(column_map or {}) - set(ROW_FIELDS))
    if unknown:
        raise InputError(f"column_map keys must be among {list(ROW_FIELDS)}; got {unknown}")
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
        yield from (dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True))


def _alpaca_rows(records: Iterable[dict], mapping: dict, id_column: str, report: LoadReport) -> Iterator:
    needed = [column for column in mapping.values() if column] + [id_column]
    for index, record in enumerate(_records(records, needed)):
        values = {name: record.get(column) if column else "" for name, column in mapping.items()}
        given_id = record.get(id_column)
        yield index, (None if given_id is None else str(given_id)), values


def _sharegpt_rows(records: Iterable[dict], report: LoadReport) -> Iterator:
    for index, record in enumerate(_records(records, ["conversations", "id"])):
        turns = record.get("conversations") or []
        conversation_id = str(record.get("id", index))
        produced = False
        for turn_number, turn in enumerate(turns):
            if _role(turn) not in _HUMAN_ROLES:
                continue
            produced = True
            reply = turns[turn_number + 1] if turn_number + 1 < len(turns) else None
            row_id = f"{conversation_id}#{turn_number}"
            if reply is None or _role(reply) not in _ASSISTANT_ROLES:
                report.rows_extracted += 1
                report.dropped.append(DroppedRow(index, "no assistant reply", f"turn {turn_number}", row_id))
                continue
            yield index, row_id, {"instruction": turn.get("value"), "input": "", "output": reply.get("value")}
        if not produced:
            report.rows_extracted += 1
            report.dropped.append(DroppedRow(index, "conversation without a human turn", "", conversation_id))


def _role(turn: Any) -> str:
    return str(turn.get("from", turn.get("role", ""))).lower() if isinstance(turn, dict) else ""


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


def _validate(candidates: Iterator, report: LoadReport) -> dict[str, list]:
    rows: dict[str, list] = {name: [] for name in ROW_FEATURES}
    first_seen: dict[str, str] = {}  # content fingerprint -> id of the row kept
    seen_ids: set[str] = set()
    type_problems: list[str] = []
    for source_index, given_id, values in candidates:
        report.rows_extracted += 1
        text = {}
        for name in ROW_FIELDS:
            value = values.get(name)
            if value is not None and not isinstance(value, str):
                type_problems.append(f"record {source_index} field {name!r} holds {type(value).__name__} {value!r:.40}")
            text[name] = value.strip() if isinstance(value, str) else ""
        if type_problems:
            continue
        row_id = given_id or content_id(text["instruction"], text["input"], text["output"])
        if given_id is not None and given_id in seen_ids:
            raise InputError(f"{report.source}: id {given_id!r} appears more than once (record {source_index})")
        if not _keep(source_index, row_id, text, first_seen, report):
            continue
        seen_ids.add(row_id)
        for name, value in (("id", row_id), *text.items(), ("source_index", source_index)):
            rows[name].append(value)
    if type_problems:
        shown = "; ".join(type_problems[:_MAX_LISTED_PROBLEMS])
        raise InputError(
            f"{report.source}: {len(type_problems)} value(s) are not strings ({shown}). "
            "instruction, input and output must be text; convert or map other columns."
        )
    return rows


def _keep(index: int, row_id: str, text: dict, first_seen: dict, report: LoadReport) -> bool:
    if not text["instruction"]:
        report.dropped.append(DroppedRow(index, "empty instruction", "", row_id))
        return False
    if not text["output"]:
        report.dropped.append(DroppedRow(index, "empty output", "", row_id))
        return False
    fingerprint = content_id(text["instruction"], text["input"], text["output"])
    if fingerprint in first_seen:
        detail = f"same instruction, input and output as row {first_seen[fingerprint]}"
        report.dropped.append(DroppedRow(index, "exact duplicate", detail, row_id))
        return False
    first_seen[fingerprint] = row_id
    return True
