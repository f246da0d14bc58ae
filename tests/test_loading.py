"""Input formats and bad input on real files from ../shared/data."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset

from mergeit_hf import InputError, load_rows
from mergeit_hf.inputs.loading import content_id
from tests.conftest import shared


def test_alpaca_json_rows_get_stable_content_ids():
    rows, report = load_rows(shared("gpteacher_roleplay.json"))
    again, _ = load_rows(shared("gpteacher_roleplay.json"))
    assert report.records_read == 3146
    assert report.rows_valid == len(rows) == report.rows_extracted - len(report.dropped)
    assert rows["id"] == again["id"]
    assert len(set(rows["id"])) == len(rows)
    first = rows[0]
    assert first["id"] == content_id(first["instruction"], first["input"], first["output"])


def test_every_record_is_a_row_or_a_counted_drop():
    rows, report = load_rows(shared("gpteacher_toolformer.json"))
    assert len(rows) + len(report.dropped) == report.rows_extracted == report.records_read
    for dropped in report.dropped:
        assert dropped.reason and dropped.id


def test_seed_tasks_are_nested_one_row_per_instance():
    rows, report = load_rows(shared("alpaca_seed_tasks.jsonl"))
    records = [json.loads(line) for line in shared("alpaca_seed_tasks.jsonl").read_text().splitlines()]
    assert report.input_format == "seed_tasks"
    assert report.rows_extracted == sum(len(r["instances"]) for r in records)
    assert rows[0]["id"] == f"{records[0]['id']}#0"
    assert rows[0]["instruction"] == records[0]["instruction"]


def test_column_map_and_missing_column_error_lists_columns(tmp_path):
    records = json.loads(shared("gpteacher_roleplay.json").read_text())[:50]
    renamed = [{"prompt": r["instruction"], "context": r["input"], "response": r["output"]} for r in records]
    path = tmp_path / "renamed.json"
    path.write_text(json.dumps(renamed))
    with pytest.raises(InputError) as error:
        load_rows(path)
    assert "'instruction'" in str(error.value) and "prompt" in str(error.value) and "response" in str(error.value)
    rows, _ = load_rows(path, column_map={"instruction": "prompt", "input": "context", "output": "response"})
    assert rows["instruction"][:3] == [r["instruction"].strip() for r in records[:3]]


def test_non_string_values_are_a_clear_error(tmp_path):
    records = json.loads(shared("gpteacher_roleplay.json").read_text())[:20]
    records[7]["output"] = 42
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records))
    with pytest.raises(InputError, match=r"record 7 field 'output' holds int 42"):
        load_rows(path)


def test_empty_instructions_and_duplicates_are_dropped_and_counted(tmp_path):
    records = json.loads(shared("gpteacher_roleplay.json").read_text())[:30]
    records[3]["instruction"] = "   "
    records[5]["instruction"] = None
    records.append(dict(records[10]))
    path = tmp_path / "drops.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    rows, report = load_rows(path)
    assert report.drop_counts == {"empty instruction": 2, "exact duplicate": 1}
    assert len(rows) == 30 - 2
    duplicate = next(d for d in report.dropped if d.reason == "exact duplicate")
    assert duplicate.source_index == 30 and rows["id"][8] in duplicate.detail  # records 3 and 5 dropped


def test_truncated_json_keeps_complete_records_and_reports_the_rest(tmp_path):
    text = shared("gpteacher_roleplay.json").read_text()
    cut = text[: len(text) // 2]
    path = tmp_path / "cut.json"
    path.write_text(cut)
    rows, report = load_rows(path)
    complete = json.loads(cut[: cut.rindex("},") + 1] + "]")
    assert report.records_read == len(complete)
    assert not report.complete and report.unreadable_bytes > 0
    assert "kept the" in report.unreadable_detail
    assert "NOT READ" in report.summary()
    assert rows["output"][-1] == complete[-1]["output"].strip()


def test_json_lines_with_a_broken_line_reports_it(tmp_path):
    lines = shared("alpaca_seed_tasks.jsonl").read_text().splitlines()
    lines[4] = lines[4][:40]
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(lines))
    _, report = load_rows(path)
    assert report.records_read == len(lines) - 1
    assert "line 5" in report.unreadable_detail


def test_a_sharegpt_conversation_is_one_row_kept_whole(tmp_path):
    """Issue 22: a conversation is one row (its later turns are not rows of their own); a conversation with
    no answer, or none at all, is dropped with its reason."""
    records = json.loads(shared("gpteacher_roleplay.json").read_text())[:6]
    conversations = [
        {
            "id": "c0",
            "conversations": [
                {"from": "human", "value": records[0]["instruction"]},
                {"from": "gpt", "value": records[0]["output"]},
                {"from": "human", "value": records[1]["instruction"]},
                {"from": "gpt", "value": records[1]["output"]},
            ],
        },
        {"id": "c1", "conversations": [{"from": "human", "value": records[2]["instruction"]}]},
        {"id": "c2", "conversations": []},
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(conversations))
    rows, report = load_rows(path)
    assert report.input_format == "sharegpt"
    assert rows["id"] == ["c0"] and rows["multi_turn"] == [True]
    assert [turn["role"] for turn in rows["messages"][0]] == ["user", "assistant", "user", "assistant"]
    assert rows["messages"][0][3]["content"] == records[1]["output"]
    assert rows["output"][0] == records[0]["output"].strip()
    assert report.drop_counts == {
        "bad conversation: does not end with an assistant turn": 1,
        "bad conversation: not a list of turns": 1,
    }
    assert report.rows_extracted == 3


def test_parquet_input(tmp_path):
    records = json.loads(shared("gpteacher_toolformer.json").read_text())[:40]
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(records), path)
    rows, report = load_rows(path)
    assert len(rows) + len(report.dropped) == 40


def test_given_ids_must_be_unique(tmp_path):
    records = json.loads(shared("gpteacher_roleplay.json").read_text())[:5]
    for index, record in enumerate(records):
        record["id"] = "same" if index in (1, 3) else f"r{index}"
    path = tmp_path / "ids.json"
    path.write_text(json.dumps(records))
    with pytest.raises(InputError, match="'same' appears more than once"):
        load_rows(path)


def test_missing_file_and_unknown_hub_name_are_clear(tmp_path):
    with pytest.raises(InputError, match="input file not found"):
        load_rows(tmp_path / "nope.json")


def _with_vectors(records: list[dict]) -> list[dict]:
    return [{**r, "embedding": [float(i), 1.0, float(i % 3)]} for i, r in enumerate(records)]


def test_parquet_is_read_through_arrow_and_its_embeddings_stay_aligned(tmp_path):
    """A parquet file becomes a memory-mapped Arrow dataset; the embeddings of kept rows join them in Arrow."""
    from mergeit_hf.inputs.files import _read_file

    records = _with_vectors(json.loads(shared("gpteacher_toolformer.json").read_text())[:60])
    records[7]["instruction"] = ""  # dropped: the embeddings after it must still match their rows
    records[20] = {**records[10], "embedding": [9.0, 9.0, 9.0]}  # an exact duplicate of row 10, dropped
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(records), path)
    read, _ = _read_file(path)
    assert isinstance(read, Dataset) and read.cache_files  # memory-mapped, not Python lists
    rows, report = load_rows(path)
    assert report.drop_counts == {"empty instruction": 1, "exact duplicate": 1} and len(rows) == 58
    for row in rows:
        assert row["embedding"] == records[row["source_index"]]["embedding"]


def test_json_lines_stream_through_arrow_with_broken_lines_counted(tmp_path):
    records = _with_vectors(json.loads(shared("gpteacher_roleplay.json").read_text())[:50])
    lines = [json.dumps(r) for r in records]
    lines[3] = lines[3][:60]  # cut mid-record
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    rows, report = load_rows(path)
    assert report.records_read == 49 and "line 4" in report.unreadable_detail and report.unreadable_bytes == 60
    kept = [r for i, r in enumerate(records) if i != 3]
    assert rows["embedding"][5] == kept[rows["source_index"][5]]["embedding"]
    path.write_text("\n".join([*lines[:3], "[1, 2]", *lines[4:]]))
    with pytest.raises(InputError, match=r"line 4 is a JSON list, expected an object"):
        load_rows(path)


def test_ragged_embeddings_in_parquet_are_named(tmp_path):
    records = _with_vectors(json.loads(shared("gpteacher_toolformer.json").read_text())[:12])
    records[5]["embedding"] = [1.0, 2.0]
    path = tmp_path / "ragged.parquet"
    pq.write_table(pa.Table.from_pylist(records), path)
    with pytest.raises(InputError, match=r"one list of numbers of one length per row; found lengths \[2, 3\]"):
        load_rows(path)


def test_a_file_that_is_not_parquet_is_named(tmp_path):
    path = tmp_path / "rows.parquet"
    path.write_text("instruction,output\nnot,parquet\n")
    with pytest.raises(InputError, match=r"rows.parquet cannot be read as parquet"):
        load_rows(path)
