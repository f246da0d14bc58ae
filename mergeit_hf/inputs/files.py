"""Reading a source into records: a file (JSON array, JSON lines, parquet), a run's output folder, a Hub
dataset, or a ``datasets.Dataset``; what could not be read is counted in the report, never skipped silently."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from datasets import Dataset

from mergeit_hf.errors import InputError
from mergeit_hf.inputs.report import LoadReport
from mergeit_hf.progress import datasets_bars_off, datasets_errors_expected

_MAX_LISTED_PROBLEMS = 5


def read_source(source: str | Path | Dataset, split: str) -> tuple[Iterable[dict], list[str], LoadReport]:
    if isinstance(source, Dataset):
        report = LoadReport(source="<Dataset>", input_format="auto", records_read=len(source))
        return source, list(source.column_names), report
    path = Path(source)
    shards = sorted((path / "data").glob("*.parquet")) if path.is_dir() else []
    if shards:  # a run's output folder (or any dataset repository laid out as the Hub's)
        report = LoadReport(source=str(path), input_format="auto")
        records = _built(shards, "parquet")
        report.records_read = len(records)
        return records, sorted(records.column_names), report
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


def _built(path: Path | list[Path], builder: str) -> Dataset:
    """The file(s) through datasets' own builder, cached as Arrow beside datasets' other caches."""
    from datasets import load_dataset

    files = [str(p) for p in path] if isinstance(path, list) else str(path)
    with datasets_bars_off():  # a bar per load would repeat on every rerun of the same file
        return load_dataset(builder, data_files=files, split="train")


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
