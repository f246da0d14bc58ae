"""The end of a run holds no Python object per input row: the final rows and the accounting are built a batch
at a time and with Arrow compute, so at a million rows the driver's memory is the stages', not the output's.

Python's heap is traced (``tracemalloc``; Arrow's own buffers are not in it, numpy's are), and the assembly's
peak is compared, in the same run, with the cheapest per-row form there is: each row's id and index as a dict.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import concatenate_datasets

from mergeit_hf import MergeItConfig, load_rows, run_stage1
from mergeit_hf.output.assemble import assemble
from mergeit_hf.stage2.merge.columns import outcome_columns, outcome_dataset
from mergeit_hf.stage2.merge.merger import stage2_templates
from mergeit_hf.stage2.merge.results import MergeOutcome
from tests.conftest import shared

COPIES = 4  # of the 7,673 Toolformer rows, each copy's instruction marked so none repeats another


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """30,692 real rows with embeddings brought along (300 topics and noise): stage 1 without the model."""
    rows = json.loads(shared("gpteacher_toolformer.json").read_text())
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(300, 384))
    records = []
    for copy in range(COPIES):
        for index, row in enumerate(rows):
            vector = centres[(index * 7 + copy) % 300] + rng.normal(scale=0.6, size=384)
            records.append(
                {
                    "instruction": f"{row['instruction']} (variant {copy})",
                    "input": row["input"],
                    "output": row["output"],
                    "embedding": (vector / np.linalg.norm(vector)).astype(np.float32).tolist(),
                }
            )
    path = tmp_path_factory.mktemp("assembly") / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(records), path)
    loaded, report = load_rows(path)
    return run_stage1(loaded, MergeItConfig()), report


def _traced_peak(work) -> tuple[object, int]:
    tracemalloc.start()
    try:
        result = work()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_the_assembly_holds_less_python_memory_than_one_small_dict_per_row(stage1):
    result, report = stage1
    config = MergeItConfig()
    reason = "not merged: this run was limited to 0 pairs"
    skipped = outcome_columns([MergeOutcome("skipped", reason)] * len(result.pairs), config, stage2_templates(config))
    merged_pairs = concatenate_datasets([result.pairs, outcome_dataset(skipped, config)], axis=1)
    ids = result.rows.select_columns(["id", "source_index"])
    _, per_row = _traced_peak(ids.to_list)
    assembly, peak = _traced_peak(lambda: assemble(result.selected, result.rows, merged_pairs, report, version="t"))
    assert len(assembly.accounting) == len(result.rows) == COPIES * 7673
    assert len(assembly.final) == result.n_selected and assembly.fate_counts["kept: merge skipped"] > 1000
    # The old assembly (rows as dicts, the accounting as Python lists) peaked above ``per_row``.
    assert peak < per_row / 2, f"assembly {peak / 2**20:.1f} MiB, ids as dicts {per_row / 2**20:.1f} MiB"


def test_a_run_without_pairs_keeps_every_selected_row_unpaired(stage1):
    result, report = stage1
    config = MergeItConfig()
    no_pairs = result.pairs.select(range(0))
    merged_pairs = concatenate_datasets(
        [no_pairs, outcome_dataset(outcome_columns([], config, stage2_templates(config)), config)], axis=1
    )
    assembly = assemble(result.selected, result.rows, merged_pairs, report, version="t")
    assert len(assembly.final) == result.n_selected and assembly.origin_counts == {"original": result.n_selected}
    assert assembly.fate_counts == {
        "not selected": len(result.rows) - result.n_selected,
        "kept: unpaired": result.n_selected,
    }
    assert assembly.accounting["source_index"] == sorted(assembly.accounting["source_index"])


def test_the_assembly_leaves_nothing_in_the_datasets_cache(stage1):
    """Its files go to a folder of the process's (their fingerprints are new every run: in the datasets cache
    each run would leave a copy of its final rows behind)."""
    result, report = stage1
    config = MergeItConfig()
    skipped = outcome_columns([MergeOutcome("skipped", "x")] * len(result.pairs), config, stage2_templates(config))
    merged_pairs = concatenate_datasets([result.pairs, outcome_dataset(skipped, config)], axis=1)
    folders = {Path(file["filename"]).parent for file in result.rows.cache_files}
    assert folders, "the rows were expected to be read from the datasets cache"
    before = {path for folder in folders for path in folder.iterdir()}
    assembly = assemble(result.selected, result.rows, merged_pairs, report, version="t")
    assert {path for folder in folders for path in folder.iterdir()} == before
    assert all("mergeit-assembly-" in file["filename"] for file in assembly.final.cache_files)


def test_the_card_shows_the_first_accepted_merges_else_one_rejected():
    from datasets import Dataset

    from mergeit_hf.output.card import examples

    def pairs(statuses):
        numbers = {name: [0.5] * len(statuses) for name in ("quality_a", "quality_b", "quality_merged")}
        ids = [f"p{i}" for i in range(len(statuses))]
        return Dataset.from_dict({"pair_id": ids, "merge_status": statuses, **numbers})

    shown = examples(pairs(["rejected", "accepted", "failed", "accepted", "accepted"]))
    assert [row["pair_id"] for row in shown] == ["p1", "p3"] and shown[0]["title"] == "An accepted merge"
    shown = examples(pairs(["failed", "rejected", "rejected"]))
    assert [row["pair_id"] for row in shown] == ["p1"] and shown[0]["quality_a"] == "0.50"
    assert examples(pairs(["failed", "skipped"])) == []
