"""Issue 23: every server kept busy without being told its size, one limit per endpoint shared by every role,
problems reported before the work starts, and counts that match the server's log.

The limit's rules are checked on scripted answers (no clock); against scripted servers, what is asserted is
what the scheduling guarantees whatever the machine's load: a comparison inside one run, or a bound that
queueing sets (the throughput figures are bench/capacity.py's).
"""

from __future__ import annotations

import asyncio

import pytest

from mergeit_hf import MergeItConfig, load_rows
from mergeit_hf.endpoints.sending.ledger import RequestLedger
from mergeit_hf.endpoints.sending.limit import START_LIMIT, EndpointLoad, request_role
from mergeit_hf.endpoints.sending.sync import run_sync
from mergeit_hf.engines.datasets_engine import merge_stage
from mergeit_hf.errors import EndpointConfigError, EndpointError, QualityScoringError
from mergeit_hf.run import pipeline
from mergeit_hf.stage2.merge.merger import Merger
from tests.conftest import shared
from tests.helpers.pairs import FAST, pairs_dataset, real_rows, restating_scripts
from tests.helpers.scripted import ScriptedServer, peaked


def _round(load: EndpointLoad, latency_s: float, status: int = 200, headers: dict | None = None) -> None:
    """One round of answers with the limit in use: every place taken, then each answered."""

    async def one_round() -> None:
        entered = asyncio.Event()
        holders = load.current
        release = asyncio.Event()

        async def hold() -> None:
            async with load.slot():
                if load.in_flight >= holders:
                    entered.set()
                await release.wait()
                load.answered(status, latency_s, headers)

        tasks = [asyncio.ensure_future(hold()) for _ in range(holders)]
        await entered.wait()
        release.set()
        await asyncio.gather(*tasks)

    asyncio.run(one_round())


def test_the_limit_doubles_while_answers_keep_their_speed_then_shrinks_when_they_queue():
    load = EndpointLoad("test")
    assert load.current == START_LIMIT
    for _ in range(3):
        _round(load, 0.5)
    assert load.current == START_LIMIT * 8  # slow start: doubled each round
    for _ in range(3):
        _round(load, 2.0)  # four times slower: requests queue at the server
    assert load.current < START_LIMIT * 8 / 2
    grown = load.current
    _round(load, 0.5)
    _round(load, 0.5)
    assert load.current <= grown * 1.25 + 2  # after a sign of load, growth is by a tenth, not doubling


def test_a_throttle_cuts_the_limit_once_a_round_and_growth_past_it_is_careful():
    load = EndpointLoad("test", limit=40)
    load._slow_start = False
    for _ in range(10):  # a burst of 429s is one signal
        load.answered(429, 0.1)
    assert load.current == 30 and load.throttled == 10
    for _ in range(4):
        _round(load, 0.1)
    assert load.current <= 40 + 2  # back to where the server said no, then one at a time
    load.answered(None, 30.0)  # a timeout or a dropped connection: counted apart from the 429s
    assert load.describe()["throttled (429/503)"] == "10" and load.describe()["unanswered (timeout or dropped)"] == "1"
    ledger = RequestLedger()
    ledger.add(load)
    assert ledger.to_dict()["throttled"] == 10 and ledger.to_dict()["unanswered"] == 1  # the run's total too


def test_a_429_that_says_the_rate_window_is_spent_cuts_by_a_tenth_not_a_quarter():
    """A rate limit is a ceiling just crossed: a quarter off would leave much of the window unused. A 503,
    headers or not, is a server out of room: a quarter. The round that was cut does not grow it back."""
    spent = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "9ms"}
    rate_limited, slot_limited, unavailable = (EndpointLoad(name, limit=40) for name in ("api", "server", "busy"))
    for load, status, headers in ((rate_limited, 429, spent), (slot_limited, 429, None), (unavailable, 503, spent)):
        load._slow_start = False
        load.answered(status, 0.1, headers=headers)
        load._busy_at_peak = True  # the limit was in use this round (the places are not held here)
        for _ in range(load.current):  # the rest of the round answered, the window with room again
            load.answered(200, 0.1, headers={"x-ratelimit-remaining-requests": "30"})
    assert (rate_limited.current, slot_limited.current, unavailable.current) == (36, 30, 30)
    assert rate_limited.throttled == slot_limited.throttled == unavailable.throttled == 1


def test_slow_start_grows_no_further_than_the_rate_window_has_room_for():
    """An API admitting 50 a second, the limit at 32: the answers say 18 are left; doubling to 64 would be
    refused 14 times a second, the limit goes to 50 and slow start ends there."""
    load, unsaid = EndpointLoad("api", limit=32), EndpointLoad("server", limit=32)
    _round(load, 1.0, headers={"x-ratelimit-remaining-requests": "18"})
    _round(unsaid, 1.0)
    assert (load.current, load.exploring) == (50, False)
    assert (unsaid.current, unsaid.exploring) == (64, True)  # a server that says nothing: doubled
    _round(load, 1.0, headers={"x-ratelimit-remaining-requests": "2"})
    assert load.current == 52  # growth by a tenth would be 55: the window has room for 2
    _round(load, 1.0, headers={"x-ratelimit-remaining-requests": "many"})  # not a count: as if unsaid
    assert load.current == 57  # no cap this round (the last round's room is not kept): a tenth


def test_a_spent_rate_window_holds_the_limit_and_a_fixed_limit_never_moves():
    load = EndpointLoad("test", limit=20)
    _round(load, 0.1, headers={"x-ratelimit-remaining-requests": "0"})
    _round(load, 0.1, headers={"x-ratelimit-remaining-requests": "0"})
    assert load.current == 20 and load.throttled == 0  # exactly at the window: held, neither grown nor cut
    _round(load, 0.1, headers={"x-ratelimit-remaining-requests": "7"})
    assert 20 < load.current <= 22  # room again: growth resumes, carefully (slow start is over)
    fixed = EndpointLoad("test", limit=128, fixed=True)
    for _ in range(3):
        _round(fixed, 0.1)
    fixed.answered(429, 0.1)
    assert fixed.current == 128


def test_latency_is_compared_within_a_role():
    """A merge takes a hundred times a score: alternating them is no sign of load."""
    load = EndpointLoad("test")
    for _ in range(3):
        for role, latency in (("merge", 2.0), ("score", 0.02)):
            token = request_role.set(role)
            _round(load, latency)
            request_role.reset(token)
    assert load.current > START_LIMIT * 4


@pytest.fixture(scope="module")
def rows():
    return real_rows("gpteacher_roleplay.json", list(range(400)))


def _pairs(rows, n):
    return pairs_dataset(*zip(rows[: 2 * n : 2], rows[1 : 2 * n : 2], strict=True))


def test_an_unannounced_128_slot_server_gets_more_than_a_fixed_8(rows, tmp_path):
    """A vLLM-shaped server (no /info): the adaptive limit grows past the old default of 8 in the same run
    in which a fixed 8 is held to 8."""
    pairs = _pairs(rows, 200)
    server = ScriptedServer(*restating_scripts(rows), slots=128, latency_s=0.3, serves_info=False).start()
    try:
        config = {**FAST.to_dict(), "model": "scripted/merge-model"}
        fixed = Merger(
            endpoint=server.url, config=MergeItConfig(**{**config, "concurrency": 8}), cache_dir=str(tmp_path / "8")
        )
        merge_stage(pairs.select(range(60)), fixed)
        held_fixed = max(server.held)
        server.held.clear()
        server.requests.clear()
        adaptive = Merger(endpoint=server.url, config=MergeItConfig(**config), cache_dir=str(tmp_path / "a"))
        merged, batch = merge_stage(pairs, adaptive)
    finally:
        server.stop()
    assert held_fixed == 8
    assert max(server.held) > 4 * held_fixed, max(server.held)
    assert set(merged["merge_status"]) == {"accepted"}
    described = batch.endpoints["merge"]
    assert described["concurrency"].startswith("adaptive") and described["retried"] == "0"
    # the server's count is the run's: merges and scores, each counted once
    assert sum(server.requests.values()) == adaptive.ledger.total == 4 * len(pairs)
    assert adaptive.ledger.sent["merge"] == len(pairs) and adaptive.ledger.sent["score"] == 3 * len(pairs)


def test_a_one_slot_server_is_not_pushed_past_what_it_takes(rows, tmp_path):
    server = ScriptedServer(*restating_scripts(rows), slots=1, latency_s=0.05, serves_info=False).start()
    try:
        config = MergeItConfig(**{**FAST.to_dict(), "model": "scripted/merge-model"})
        merger = Merger(endpoint=server.url, config=config, cache_dir=str(tmp_path))
        merged, batch = merge_stage(_pairs(rows, 30), merger)
    finally:
        server.stop()
    assert set(merged["merge_status"]) == {"accepted"}
    # answers queue one behind the other: the limit never grows past where it started
    assert int(batch.endpoints["merge"]["concurrency"].split(", ")[1].split()[0]) == START_LIMIT


def test_a_rate_limited_api_is_throttled_not_failed(rows, tmp_path):
    server = ScriptedServer(*restating_scripts(rows), slots=512, latency_s=0.2, serves_info=False, rate_per_s=40)
    server.start()
    try:
        config = MergeItConfig(**{**FAST.to_dict(), "model": "scripted/merge-model", "request_retries": 8})
        merger = Merger(endpoint=server.url, config=config, cache_dir=str(tmp_path))
        merged, _ = merge_stage(_pairs(rows, 60), merger)
    finally:
        server.stop()
    assert merged["merge_status"].count("failed") == 0
    assert merger.ledger.throttled == server.refused  # every 429 the server sent, counted
    assert merger.ledger.total == sum(server.requests.values()) + server.refused


def test_one_endpoint_serving_merges_scores_and_the_judge_has_one_limit(rows, tmp_path):
    server = ScriptedServer(*restating_scripts(rows), slots=16, judge=lambda prompt: 0.9).start()
    try:
        config = MergeItConfig(**{**FAST.to_dict(), "judge": True})
        merger = Merger(endpoint=server.url, config=config, cache_dir=str(tmp_path))

        async def session_loads() -> int:
            async with merger.session() as session:
                assert session.merges is session.scorer.scheduler
                assert session.judge is not None and session.judge.scheduler.load is session.merges.load
                return len(session.loads)

        assert run_sync(session_loads()) == 1
        merge_stage(_pairs(rows, 20), merger)
    finally:
        server.stop()
    assert max(server.held) <= 16  # TGI's announced 16, for every role together
    assert merger.ledger.sent["judge"] == 20


def _never_stage1(monkeypatch):
    monkeypatch.setattr(pipeline.Engine, "run_stage1", lambda *a: pytest.fail("stage 1 started before the probe"))


def test_an_unreachable_server_is_refused_before_stage_1(monkeypatch):
    _never_stage1(monkeypatch)
    with pytest.raises(EndpointError, match=r"cannot reach the LLM endpoint http://127\.0\.0\.1:9/"):
        pipeline.run_pipeline(shared("gpteacher_toolformer.json"), endpoint="http://127.0.0.1:9")


def test_a_wrong_model_is_refused_before_stage_1_naming_the_flag(rows, monkeypatch):
    _never_stage1(monkeypatch)
    from tests.helpers.dialects import DialectServer

    server = DialectServer(*restating_scripts(rows), dialect="vllm", served=("Qwen/Qwen2.5-1.5B-Instruct",)).start()
    try:
        config = MergeItConfig(model="Qwen/wrong-model")
        with pytest.raises(EndpointConfigError, match="pass one of them as --model"):
            pipeline.run_pipeline(shared("gpteacher_toolformer.json"), config, endpoint=server.url)
    finally:
        server.stop()


def test_a_wrong_key_is_refused_before_stage_1_naming_the_variable(rows, monkeypatch):
    _never_stage1(monkeypatch)
    from tests.helpers.dialects import DialectServer

    monkeypatch.setenv("MERGEIT_API_KEY", "sk-wrong")
    server = DialectServer(*restating_scripts(rows), dialect="openai", served=("gpt-4o",), api_key="sk-right").start()
    try:
        with pytest.raises(EndpointConfigError, match="set MERGEIT_API_KEY") as stopped:
            pipeline.run_pipeline(
                shared("gpteacher_toolformer.json"), MergeItConfig(model="gpt-4o"), endpoint=server.url
            )
    finally:
        server.stop()
    assert not getattr(stopped.value, "__notes__", None)  # nothing was received: no word of resuming


def test_a_parameter_every_request_carries_stops_the_run_at_the_first_refusal(rows, tmp_path):
    server = ScriptedServer(*restating_scripts(rows), slots=64, latency_s=0.05, max_logprobs=5).start()
    try:
        merger = Merger(endpoint=server.url, config=FAST, cache_dir=str(tmp_path))  # top_logprobs 20 by default
        with pytest.raises(EndpointConfigError, match="lower top_logprobs"):
            merge_stage(_pairs(rows, 100), merger)
    finally:
        server.stop()
    # stopped at the first refusals: what was already in flight, not every score of 100 pairs
    assert server.requests["refused logprobs"] < 64


def test_a_scorer_without_digits_stops_before_merging(rows, tmp_path):
    merge, _ = restating_scripts(rows)
    server = ScriptedServer(merge, lambda instruction, output: {"The": 0.6, "This": 0.4}).start()
    try:
        rows_in, _ = load_rows(shared("gpteacher_roleplay.json"))
        config = MergeItConfig(
            n_clusters=4, selection_budget=1.0, tau=0.5, scorer_check_rows=4, compute_retention=False, min_retention=0.0
        )
        with pytest.raises(QualityScoringError, match="no digit 1-6") as stopped:
            pipeline.run_pipeline(rows_in.select(range(60)), config, endpoint=server.url, cache_dir=str(tmp_path))
    finally:
        server.stop()
    assert server.requests["merge"] == 0
    assert stopped.value.__notes__ == [pipeline.RESUME_NOTE]  # the CLI prints how to resume under the error


def test_peaked_helper_is_a_distribution():
    assert abs(sum(peaked(4).values()) - 1.0) < 1e-9
