"""Issue 9: Deita complexity scores and the quality × complexity prefilter, on real rows, scripted server."""

from __future__ import annotations

import json
import math

import pytest
from datasets import Dataset

from mergeit_hf.stage2.scoring.deita import expected_score
from tests.conftest import shared
from tests.helpers.pairs import cli_run, restate_all
from tests.helpers.scripted import ScriptedServer, peaked

#: Deita's complexity prompt as its model card (hkust-nlp/deita-complexity-scorer) writes it.
DEITA_COMPLEXITY = (
    "You are a helpful assistant. Please identify the complexity score of the following user query. \n"
    "##Query: {instruction}  \n##Complexity: "
)
N_ROWS, TOP = 40, 30


def _quality(instruction: str, output: str) -> dict[str, float]:
    return peaked(6) if "as a second task" in instruction else peaked(1 + len(output) % 6, 0.7)


def _complexity(query: str) -> dict[str, float]:
    return peaked(1 + len(query) % 6, 0.7)


def _value(distribution: dict[str, float]) -> float:
    return expected_score((t, math.log(p)) for t, p in distribution.items()).value


@pytest.fixture(scope="module")
def prefilter_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prefilter-run")
    rows = json.loads(shared("gpteacher_roleplay.json").read_text())[:N_ROWS]

    def merge(prompt: str, body: dict) -> dict:
        lines = [part.split("\n")[0] for part in prompt.split("Instruction: ")[1:]]
        return restate_all(*(next(r for r in rows if r["instruction"].startswith(line)) for line in lines))

    server = ScriptedServer(merge, _quality, complexity=_complexity).start()
    config = (
        f"n_clusters: 3\nselection_budget: 0.9\ntau: 0.4\nprefilter_top: {TOP}\ncomplexity_scores: true\n"
        "scorer_check_rows: 0\n"
    )
    cli_run(folder, rows, server.url, config)
    first = sum(server.requests.values())
    cli_run(folder, rows, server.url, config, output="again")
    yield folder, rows, server, first
    server.stop()


def test_prefilter_keeps_the_top_rows_by_quality_times_complexity(prefilter_run):
    folder, rows, server, _ = prefilter_run
    accounting = Dataset.from_parquet(str(folder / "out" / "mergeit" / "accounting.parquet"))
    assert len(accounting) == N_ROWS  # every input row, once
    left_out = accounting.filter(lambda row: row["fate"] == "prefiltered")
    assert len(left_out) == N_ROWS - TOP
    products = []
    for row in rows:
        query = "\n".join(x for x in (row["instruction"], row["input"]) if x)
        products.append(_value(_quality(query, row["output"])) * _value(_complexity(query)))
    cutoff = sorted(products, reverse=True)[TOP - 1]
    for row in left_out:
        assert products[row["source_index"]] <= cutoff + 1e-9
        assert "below the cutoff" in row["detail"] and f"the top {TOP} of {N_ROWS} rows were kept" in row["detail"]
    kept = [row["source_index"] for row in accounting if row["fate"] != "prefiltered"]
    assert min(products[i] for i in kept) >= cutoff - 1e-9
    record = json.loads((folder / "out" / "mergeit" / "run.json").read_text())
    assert record["counts"]["left out by the prefilter"] == N_ROWS - TOP
    complexity_prompts = {p for p in server.prompts if p.endswith("##Complexity: ")}
    for row in rows:  # every row's complexity prompt is Deita's, byte for byte
        query = "\n".join(x for x in (row["instruction"], row["input"]) if x)
        assert DEITA_COMPLEXITY.format(instruction=query) in complexity_prompts


def test_complexity_columns_and_a_second_run_sends_nothing(prefilter_run):
    folder, _, server, first = prefilter_run
    assert sum(server.requests.values()) == first  # the second run came from the request cache
    assert server.requests["complexity"] > 0
    pairs = Dataset.from_parquet(str(folder / "out" / "mergeit" / "pairs.parquet"))
    scored = pairs.filter(lambda row: row["merge_status"] in ("accepted", "rejected"))
    assert len(scored) > 0
    for row in scored:
        assert 1 <= row["complexity_a"] <= 6 and 1 <= row["complexity_b"] <= 6 and 1 <= row["complexity_merged"] <= 6
        assert len(row["complexity_more"]) == row["group_size"] - 2
