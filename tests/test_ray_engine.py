"""Issue 17: the same stages on Ray Data. `mergeit run --engine ray` and `mergeit run` on the same 2,500
real rows, against the same scripted server, each with its own request cache: every row's fate, every pair
and every merge status agree, and the Ray run says Ray ran. Ray runs locally here (2 CPUs)."""

from __future__ import annotations

import json

import pytest

from mergeit_hf.engines.choice import Engine
from mergeit_hf.errors import ConfigError
from mergeit_hf.output.folder import OutputFolder
from mergeit_hf.run.cli import main
from tests.conftest import shared
from tests.helpers.pairs import restating_scripts
from tests.helpers.scripted import ScriptedServer, peaked

N_ROWS = 2500


@pytest.fixture(scope="module")
def both_engines(tmp_path_factory):
    pytest.importorskip("ray")
    rows = json.loads(shared("gpteacher_roleplay.json").read_text())[:N_ROWS]
    merge, _ = restating_scripts(rows)

    def score(instruction: str, output: str) -> dict[str, float]:  # statuses that vary from pair to pair
        return peaked(6 - len(output) % 3) if "as a second task" in instruction else peaked(2 + len(output) % 3)

    server = ScriptedServer(merge, score, slots=8).start()
    folder = tmp_path_factory.mktemp("engines")
    data, config = folder / "rows.json", folder / "config.yaml"
    data.write_text(json.dumps(rows))
    config.write_text("scorer_check_rows: 0\nalpha: 0.75\n")
    outputs, sent = {}, {}
    try:
        for engine in ("datasets", "ray", "ray-again"):
            out = folder / engine
            args = ["run", str(data), "--output", str(out), "--endpoint", server.url, "--config", str(config)]
            cache = folder / f"cache-{engine.removesuffix('-again')}"  # the rerun resumes from the Ray run's cache
            assert main([*args, "--cache-dir", str(cache), "--engine", engine.removesuffix("-again")]) == 0
            outputs[engine], sent[engine] = OutputFolder.open(out), sum(server.requests.values())
    finally:
        server.stop()
    outputs["requests after each run"] = sent
    outputs["ray cache"] = folder / "cache-ray"
    yield outputs


def test_both_engines_agree_on_every_row_pair_and_merge(both_engines, capfd):
    plain, ray = both_engines["datasets"], both_engines["ray"]
    fates = lambda out: out.accounting.select_columns(["id", "fate", "detail", "output_id"]).to_list()  # noqa: E731
    assert len(plain.accounting) == N_ROWS and fates(ray) == fates(plain)
    decisions = ["pair_id", "merge_status", "merge_reason", "retention_a", "retention_b", "merged_output"]
    assert ray.pairs.select_columns(decisions).to_list() == plain.pairs.select_columns(decisions).to_list()
    statuses = set(plain.pairs["merge_status"])
    assert {"accepted", "rejected"} <= statuses, statuses  # the comparison covers both outcomes
    assert ray.final["id"] == plain.final["id"] and ray.final["output"] == plain.final["output"]
    assert ray.record.counts == plain.record.counts and ray.record.embedding_source.endswith("CPU actors)")
    assert plain.record.engine == "datasets" and ray.record.engine.startswith("Ray ")
    assert "- Engine: Ray " in (ray.folder / "README.md").read_text()


def test_a_ray_run_again_sends_nothing(both_engines):
    """The merge actors write every answer to the request cache: a rerun (after a kill, too) sends nothing."""
    sent = both_engines["requests after each run"]
    assert sent["ray"] > sent["datasets"] and sent["ray-again"] == sent["ray"]
    again, first = both_engines["ray-again"], both_engines["ray"]
    assert again.pairs["merge_status"] == first.pairs["merge_status"]
    # The cache a cluster can share (one append-only file per writer), not SQLite's WAL (unsafe over NFS).
    cache = both_engines["ray cache"]
    assert list(cache.glob("requests.*.jsonl")) and not (cache / "requests.sqlite3").exists()


def test_the_ray_run_says_ray_ran(both_engines):
    pytest.importorskip("ray")
    import ray

    assert ray.is_initialized()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    assert len(nodes) == 1  # the local Ray this run started


def test_an_address_needs_the_ray_engine():
    with pytest.raises(ConfigError, match="add --engine ray"):
        Engine("datasets", ray_address="ray://head:10001")
    with pytest.raises(ConfigError, match="engine must be one of"):
        Engine("spark")  # type: ignore[arg-type]


def _report_cell(report) -> bytes:
    import pickle

    return pickle.dumps(report)


class _Blocks:
    """What Ray Data hands the driver from the merge actors: output blocks, each joining one or more batches."""

    def __init__(self, blocks: list[dict]) -> None:
        self.blocks = blocks

    def iter_batches(self, batch_size=None, batch_format="numpy"):
        yield from self.blocks


def _block(batches: list[tuple[list[int], object]]) -> dict:
    import pickle

    import numpy as np

    from mergeit_hf.engines.ray.merge_actor import OUTCOME, POSITION, REPORT

    positions, outcomes, reports = [], [], []
    for batch_positions, report in batches:
        positions += batch_positions
        outcomes += [pickle.dumps(f"outcome {p}") for p in batch_positions]
        reports += [_report_cell(report)] + [b""] * (len(batch_positions) - 1)
    return {
        POSITION: np.asarray(positions),
        OUTCOME: np.asarray(outcomes, dtype=object),
        REPORT: np.asarray(reports, dtype=object),
    }


def _merger():
    from mergeit_hf.config import MergeItConfig
    from mergeit_hf.stage2.merge.merger import Merger

    return Merger("http://merge.invalid", MergeItConfig(), use_cache=False, show_progress=False)


def test_every_batch_s_report_in_a_joined_block_is_counted():
    from collections import Counter

    from mergeit_hf.endpoints.sending.ledger import RequestLedger
    from mergeit_hf.engines.ray.merge_actor import BatchReport
    from mergeit_hf.engines.ray.stage2 import _collected

    def sent(n: int) -> BatchReport:
        return BatchReport("actor", RequestLedger(Counter(merge=n)))

    merger = _merger()
    merged = _Blocks([_block([([0, 1], sent(2)), ([2, 3, 4], sent(3))]), _block([([5], sent(1))])])
    batch = _collected(merged, 6, merger)
    assert batch.outcomes == [f"outcome {p}" for p in range(6)]
    assert merger.ledger.sent == Counter(merge=6)  # all three batches, not the first of each block


def test_a_stop_in_a_later_batch_of_a_block_is_raised_with_its_advice():
    from mergeit_hf.engines.ray.merge_actor import BatchReport
    from mergeit_hf.engines.ray.stage2 import _collected
    from mergeit_hf.errors import EndpointConfigError

    refused = EndpointConfigError("http://merge.invalid answered HTTP 401: no; set MERGEIT_API_KEY")
    merged = _Blocks([_block([([0, 1], BatchReport("actor")), ([-1], BatchReport(stopped=refused))])])
    with pytest.raises(EndpointConfigError, match="MERGEIT_API_KEY"):
        _collected(merged, 3, _merger())
