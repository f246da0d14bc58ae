"""Issue 25: with ``--engine ray`` the cluster reads a parquet input itself (Ray tasks, one row group each),
checks every record there, and keeps stage 1's rows in the cluster; what the driver gets back is what the
datasets engine builds, row for row: the same report and drops, rows, selection, pairs. Ray runs locally
here (2 CPUs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mergeit_hf.config import MergeItConfig
from mergeit_hf.engines.choice import Engine
from mergeit_hf.errors import InputError
from mergeit_hf.run.pipeline import plan
from tests.conftest import shared


@pytest.fixture(scope="module")
def ray_engine():
    pytest.importorskip("ray")
    engine = Engine("ray")
    engine.start()
    return engine


def _alpaca_with_embeddings(path, n_rows: int = 2000) -> None:
    """Real rows with vectors of the model's 384 dimensions (not of unit length, so they are normalised), an
    empty instruction, an empty output, a record repeated whole, and row groups of 300."""
    rows = json.loads(shared("gpteacher_toolformer.json").read_text())[:n_rows]
    rows[5]["output"], rows[9]["instruction"] = "", "   "
    rows[40] = dict(rows[12])
    vectors = np.random.default_rng(0).normal(size=(n_rows, 384)).astype(np.float32) * 3
    vectors[40] = vectors[12]
    for row, vector in zip(rows, vectors, strict=True):
        row["embedding"] = vector.tolist()
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=300)


def _conversations(path, n_rows: int = 1100) -> None:
    """Conversations (more than one embedding batch of 1,024): a system prompt on every third, a second user
    turn on every fiftieth, one that does not end with the assistant, in row groups of 400."""
    rows = json.loads(shared("gpteacher_roleplay.json").read_text())[:n_rows]
    records = []
    for i, row in enumerate(rows):
        turns = [{"role": "system", "content": "Stay in character."}] if i % 3 == 0 else []
        turns += [
            {"role": "user", "content": f"{row['instruction']} {row['input']}".strip()},
            {"role": "assistant", "content": row["output"]},
        ]
        if i % 50 == 0:
            turns += [{"role": "user", "content": "Go on."}, {"role": "assistant", "content": f"Then {i}."}]
        records.append({"messages": turns})
    records[11] = {"messages": [{"role": "user", "content": "Hello?"}]}
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=400)


def _assert_same(source, ray_engine) -> None:
    config = MergeItConfig()
    on_cluster, report = ray_engine.load(source)
    assert type(on_cluster).__name__ == "ValidRows"  # the cluster read it; the driver holds no row
    plain_report, plain = plan(source, config)
    ray_report, ray = plan(source, config, engine=ray_engine)
    assert ray_report.summary() == plain_report.summary() and ray_report.dropped == plain_report.dropped
    assert report.dropped == plain_report.dropped
    texts = [name for name in plain.rows.column_names if name != "embedding"]
    assert ray.rows.column_names == plain.rows.column_names
    assert ray.rows.select_columns(texts).to_list() == plain.rows.select_columns(texts).to_list()
    assert np.array_equal(np.asarray(ray.rows["embedding"]), np.asarray(plain.rows["embedding"]))
    assert ray.selected["id"] == plain.selected["id"]
    assert ray.pairs.features == plain.pairs.features and ray.pairs.to_list() == plain.pairs.to_list()
    assert ray.plan.rank_by_id == plain.plan.rank_by_id and ray.summary() == plain.summary()
    # Memory-mapped from the files the cluster wrote, not copied into the datasets cache by the driver.
    for opened in (found for found in (ray.rows, ray.selected, ray.pairs) if len(found)):  # (none: in memory)
        files = [Path(entry["filename"]) for entry in opened.cache_files]
        assert files and all(path.parent.parent.parent.name == "ray-work" for path in files), files


def test_the_cluster_reads_alpaca_rows_with_embeddings_as_load_rows_does(tmp_path, ray_engine):
    source = tmp_path / "rows.parquet"
    _alpaca_with_embeddings(source)
    _assert_same(source, ray_engine)
    report, _ = plan(source, MergeItConfig(), engine=ray_engine)
    assert report.drop_counts == {"empty instruction": 1, "empty output": 1, "exact duplicate": 1}


def test_the_cluster_reads_and_embeds_conversations_as_the_datasets_engine_does(tmp_path, ray_engine):
    source = tmp_path / "conversations.parquet"
    _conversations(source)
    _assert_same(source, ray_engine)  # embedded in the same 1,024-row batches: the same vectors to the last bit


def test_a_value_that_is_not_text_stops_the_cluster_read_with_the_count(tmp_path, ray_engine):
    source = tmp_path / "numbers.parquet"
    table = pa.table(
        {
            "instruction": [f"Task {i}" for i in range(1200)],
            "input": [""] * 1200,
            "score": list(range(1200)),  # numbers, mapped as the output: refused, every one counted
        }
    )
    pq.write_table(table, source, row_group_size=300)
    with pytest.raises(InputError, match=r"1200 value\(s\) are not strings \(record 0 field 'output' holds int 0"):
        ray_engine.load(source, column_map={"output": "score"})


def test_an_id_given_twice_stops_the_cluster_read_naming_its_second_record(tmp_path, ray_engine):
    source = tmp_path / "ids.parquet"
    table = pa.table(
        {
            "id": [f"row-{i}" for i in range(600)] + ["row-3"],
            "instruction": [f"Task {i}" for i in range(601)],
            "input": [""] * 601,
            "output": [f"Answer {i}" for i in range(601)],
        }
    )
    pq.write_table(table, source, row_group_size=200)
    with pytest.raises(InputError, match=r"id 'row-3' appears more than once \(record 600\)"):
        ray_engine.load(source)


def test_seed_tasks_whose_instances_share_a_record_agree_on_ray(ray_engine):
    source = shared("alpaca_seed_tasks.jsonl")  # read on the driver; a task's instances share source_index
    plain_report, plain = plan(source, MergeItConfig())
    ray_report, ray = plan(source, MergeItConfig(), engine=ray_engine)
    assert ray_report.summary() == plain_report.summary()
    assert (
        ray.rows.select_columns(["id", "cluster_id", "selected"]).to_list()
        == plain.rows.select_columns(["id", "cluster_id", "selected"]).to_list()
    )
    assert ray.pairs["pair_id"] == plain.pairs["pair_id"]


class _WrittenElsewhere:
    """What a cluster's write looks like to a driver that does not see the node's disk: a record of a file
    written on another machine."""

    def map_batches(self, *args, **kwargs):
        return self

    def take_all(self):
        return [{"path": "/on/another/node/0.arrow", "first": "[0]"}]


def test_a_file_the_driver_cannot_see_stops_stage1_naming_the_shared_cache_dir(tmp_path):
    pytest.importorskip("ray")
    from mergeit_hf.engines.ray.stage1 import _opened

    with pytest.raises(RuntimeError, match=r"1 of the 1 files .* \(--cache-dir\) on storage every node sees"):
        _opened(_WrittenElsewhere(), tmp_path / "rows", ["_row"], None)


def _wrong_width(vectors: np.ndarray) -> np.ndarray:
    return vectors[:, :100]


def _one_zero(vectors: np.ndarray) -> np.ndarray:
    vectors[7] = 0
    return vectors


@pytest.mark.parametrize(
    ("change", "message"),
    [(_wrong_width, r"has 100 dimensions, but .*all-MiniLM-L6-v2 makes 384"), (_one_zero, "holds all-zero vectors")],
)
def test_given_embeddings_are_refused_on_the_cluster_as_by_the_datasets_engine(tmp_path, ray_engine, change, message):
    rows = json.loads(shared("gpteacher_toolformer.json").read_text())[:60]
    vectors = change(np.random.default_rng(1).normal(size=(len(rows), 384)).astype(np.float32))
    source = tmp_path / "rows.parquet"
    pq.write_table(
        pa.Table.from_pylist([{**r, "embedding": v.tolist()} for r, v in zip(rows, vectors, strict=True)]), source
    )
    for engine in (Engine(), ray_engine):
        with pytest.raises(InputError, match=message):
            plan(source, MergeItConfig(n_clusters=2), engine=engine)
