"""How requests are admitted to an endpoint: the most urgent first, a server's own queue counts (vLLM's
/metrics) steering the adaptive limit, a window that follows the limit, and connections spread over small
pools. Orders and counts only: no timing is asserted."""

from __future__ import annotations

import asyncio
import gc
import sqlite3
import subprocess
import sys

import httpx
import pytest

from mergeit_hf import MergeItConfig
from mergeit_hf.endpoints.http.client import MOST_TIMEOUTS_WHILE_GENERATING, JsonHttpClient
from mergeit_hf.endpoints.http.pools import SpreadTransport, pool_sizes
from mergeit_hf.endpoints.probe import ServerInfo, read_queue
from mergeit_hf.endpoints.sending.limit import FINISHING, LEAF, NEW_WORK, START_LIMIT, EndpointLoad
from mergeit_hf.endpoints.sending.request_cache import RequestCache
from mergeit_hf.endpoints.sending.senders import Senders
from mergeit_hf.endpoints.sending.shared_cache import SharedRequestCache
from mergeit_hf.endpoints.sending.window import map_windowed
from mergeit_hf.endpoints.servers.hf_inference import InferenceClientBackend
from mergeit_hf.endpoints.servers.openai_chat import OpenAIChatBackend
from mergeit_hf.endpoints.servers.served import ServedBackend
from mergeit_hf.engines.datasets_engine import merge_stage
from mergeit_hf.errors import EndpointError
from mergeit_hf.stage2.merge.merger import Merger
from tests.helpers.pairs import FAST, pairs_dataset, real_rows, restating_scripts
from tests.helpers.scripted import ScriptedServer, peaked


def test_waiting_requests_are_admitted_most_urgent_first_and_a_cancelled_one_loses_no_place():
    load = EndpointLoad("test", limit=1, fixed=True)
    admitted: list[str] = []

    async def request(name: str, priority: int, hold: asyncio.Event) -> None:
        async with load.slot(priority):
            admitted.append(name)
            await hold.wait()

    async def scenario() -> None:
        first = asyncio.Event()
        go = asyncio.Event()
        go.set()
        holder = asyncio.ensure_future(request("holder", NEW_WORK, first))
        await asyncio.sleep(0)
        waiting = [
            asyncio.ensure_future(request(name, priority, go))
            for name, priority in [("source score", LEAF), ("merge", NEW_WORK), ("merged score", FINISHING)]
        ]
        cancelled = asyncio.ensure_future(request("cancelled", FINISHING, go))
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.sleep(0)
        first.set()
        await asyncio.gather(holder, *waiting)
        assert cancelled.cancelled()

    asyncio.run(scenario())
    assert admitted == ["holder", "merged score", "merge", "source score"]
    assert load.in_flight == 0


def test_a_freed_place_goes_to_the_waiter_it_wakes_not_to_a_newcomer_and_back_if_that_one_is_cancelled():
    load = EndpointLoad("test", limit=1, fixed=True)
    admitted: list[str] = []

    async def request(name: str, priority: int, hold: asyncio.Event | None = None) -> None:
        async with load.slot(priority):
            admitted.append(name)
            if hold is not None:
                await hold.wait()

    async def scenario() -> None:
        holding = load.slot(NEW_WORK)
        await holding.__aenter__()  # this coroutine holds the only place
        woken_then_cancelled = asyncio.ensure_future(request("cancelled after waking", FINISHING))
        second = asyncio.ensure_future(request("merge", NEW_WORK))
        await asyncio.sleep(0)  # both wait
        await holding.__aexit__(None, None, None)  # the place is handed to the most urgent waiter ...
        assert load.in_flight == 1
        newcomer = asyncio.ensure_future(request("newcomer", LEAF))  # ... and no newcomer may take it
        woken_then_cancelled.cancel()  # woken, then cancelled before it used the place: it goes on
        await asyncio.gather(second, newcomer, return_exceptions=True)
        assert woken_then_cancelled.cancelled()

    asyncio.run(scenario())
    assert admitted == ["merge", "newcomer"]
    assert load.in_flight == 0 and load._queued == 0


VLLM_METRICS = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 7.0
vllm:cache_config_info{block_size="16",kv_cache_max_concurrency="22.75"} 1.0
"""


def test_vllm_queue_gauges_are_read_and_summed_over_engines():
    assert read_queue(VLLM_METRICS) == (5.0, 7.0, None)
    assert read_queue("# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 1.5\n") is None
    assert read_queue("vllm:num_requests_running{} 4.0\nvllm:num_requests_waiting{} 1") == (4.0, 1.0, None)
    counted = VLLM_METRICS + 'vllm:generation_tokens_total{engine="0",model_name="m"} 1200.0\n'
    assert read_queue(counted + 'vllm:generation_tokens_total{engine="1",model_name="m"} 34.0\n') == (5.0, 7.0, 1234.0)


def _fill(load: EndpointLoad) -> None:
    load.in_flight = load.current


def test_a_server_with_room_doubles_the_limit_in_slow_start_and_a_full_one_caps_it_at_its_share():
    load = EndpointLoad("vllm")
    _fill(load)
    load.server_queue(running=load.in_flight, waiting=0)
    assert load.current == 2 * START_LIMIT
    # a reading that has not seen every request in flight yet says nothing
    _fill(load)
    load.server_queue(running=load.in_flight - 3, waiting=0)
    assert load.current == 2 * START_LIMIT
    _fill(load)
    load.server_queue(running=load.in_flight, waiting=0)
    assert load.current == 4 * START_LIMIT
    load.in_flight = 30
    load.server_queue(running=0, waiting=30)  # a server still starting: nothing to learn
    load.server_queue(running=20, waiting=10)  # one reading with requests waiting: vLLM's next step may take them
    assert load.current == 4 * START_LIMIT and load.exploring
    load.server_queue(running=20, waiting=10)  # full twice: this client's share of what runs
    assert load.current == 20 and not load.exploring
    # from here the server's readings stand in for latency: slower answers do not cut the limit ...
    load.in_flight = 0
    for _ in range(3 * load.current):
        load.answered(200, 5.0)
    assert load.current == 20
    load.server_queue(running=20, waiting=0)  # room again: growth resumes, carefully
    for _ in range(2):
        load.in_flight = load.current
        for _ in range(load.current):
            load.answered(200, 5.0)
    assert 20 < load.current <= 26
    # ... throttles still do, and a fixed limit ignores the readings
    load.answered(429, 0.1)
    assert load.current < 26
    fixed = EndpointLoad("fixed", limit=8, fixed=True)
    _fill(fixed)
    fixed.server_queue(running=8, waiting=0)
    fixed.server_queue(running=2, waiting=9)
    fixed.server_queue(running=2, waiting=9)
    assert fixed.current == 8


def test_another_client_on_the_server_leaves_this_one_its_share_not_the_whole():
    load = EndpointLoad("vllm", limit=64)
    load.in_flight = 40  # of 100 at the server: 60 run, 40 wait (this client's 40 spread over both)
    load.server_queue(running=60, waiting=40)
    load.server_queue(running=60, waiting=40)
    assert load.current == 24  # 40 × 60 / 100


def test_one_queue_watcher_per_endpoint_limit_however_many_backends_share_it():
    async def scenario() -> list[bool]:
        load = EndpointLoad("vllm")
        server = ServerInfo("m", 8, "openai", queue_metrics=True)
        backends = [
            ServedBackend(
                "http://127.0.0.1:9",
                server,
                JsonHttpClient("http://127.0.0.1:9", None, timeout_s=1, attempts=1, key_variable="K"),
            )
            for _ in range(3)
        ]
        for backend in backends:
            backend.observe(load)
        watching = [backend._watch is not None for backend in backends]
        for backend in backends:
            await backend.aclose()
        return watching

    assert asyncio.run(scenario()) == [True, False, False]


def _one_request_to(server: ScriptedServer, timeout_s: float) -> tuple[object, EndpointLoad]:
    """One chat request through the real backend, its endpoint's limit watching the server's /metrics."""

    async def scenario() -> tuple[object, EndpointLoad]:
        load = EndpointLoad("vllm", limit=2, fixed=True)
        http = JsonHttpClient(server.url, None, timeout_s=timeout_s, attempts=1, key_variable="K")
        backend = OpenAIChatBackend(server.url, ServerInfo(server.model_id, 2, "openai", queue_metrics=True), http)
        backend.observe(load)
        try:
            async with load.slot():  # as the scheduler sends (the watcher reads while requests are in flight)
                return await backend.chat([{"role": "user", "content": "Say b."}], {}), load
        except EndpointError as exc:
            return exc, load
        finally:
            await backend.aclose()

    return asyncio.run(scenario())


@pytest.mark.parametrize("generation", ["moving", "stuck"])
def test_a_request_outlives_its_timeout_while_the_server_generates_and_not_when_it_is_stuck(generation):
    """A slow answer from a server whose token count rises is waited for (a busy server, not a dead one: a
    retry would start its work again); from one whose count stands still, the request times out as before."""
    server = ScriptedServer(
        lambda prompt, body: {"instruction": "a", "input": "", "output": "b"},
        lambda instruction, output: peaked(3),
        latency_s=5.0,
        serves_info=False,
        serves_queue_metrics=True,
        generation=generation,
    )
    server.start()
    try:
        answer, load = _one_request_to(server, timeout_s=2.0)
    finally:
        server.stop()
    if generation == "moving":
        assert not isinstance(answer, Exception), answer
        assert (load.timeouts, load.kept_past_timeout) == (0, 1)
        assert load.describe()["kept past request_timeout_s (the server was generating)"] == "1"
    else:
        assert isinstance(answer, EndpointError)
        assert "ReadTimeout: no answer within request_timeout_s=2 s" in str(answer)
        assert (load.timeouts, load.kept_past_timeout) == (1, 0)


def test_a_request_waits_at_most_ten_timeouts_however_long_the_server_generates():
    http = JsonHttpClient("http://127.0.0.1:9", None, timeout_s=3.0, attempts=1, key_variable="K")
    assert http._deadline(100.0) == 103.0  # no load: the request timeout alone
    load = EndpointLoad("vllm")
    http.observe(load)
    assert http._deadline(100.0) == 103.0  # a server that has not said it generates
    load.progressed_at = 110.0
    assert http._deadline(100.0) == 113.0  # a timeout past its last progress
    load.progressed_at = 1000.0
    assert http._deadline(100.0) == 100.0 + MOST_TIMEOUTS_WHILE_GENERATING * 3.0


def test_a_request_cancelled_as_its_answer_fails_leaves_no_unread_error():
    """A pair abandons a request in the same turn of the loop as the request fails (a dropped connection):
    the failure is read, not logged by asyncio as "Task exception was never retrieved" (seen in CI)."""
    unread: list[dict] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _, context: unread.append(context))
        http = JsonHttpClient("http://127.0.0.1:9", None, timeout_s=30.0, attempts=1, key_variable="K")
        posting: asyncio.Future = asyncio.get_running_loop().create_future()
        waiting = asyncio.ensure_future(http._answer_while_generating(posting))
        await asyncio.sleep(0)  # the request now waits for its answer
        posting.set_exception(httpx.ReadError("dropped"))
        waiting.cancel()  # in the same turn: the wait is cancelled with the answer already failed
        with pytest.raises(asyncio.CancelledError):
            await waiting
        del posting, waiting
        gc.collect()  # an unread exception is reported when its future is collected

    asyncio.run(main())
    assert [c for c in unread if "never retrieved" in c.get("message", "")] == []


@pytest.fixture(scope="module")
def rows():
    return real_rows("gpteacher_roleplay.json", list(range(120)))


def test_a_vllm_shaped_server_is_read_while_sending_and_no_longer_after(rows, tmp_path):
    """The session reads /metrics while it sends (the limit leaves slow start once requests wait there),
    and its watcher has ended when the session closes."""
    pairs = pairs_dataset(*zip(rows[0:120:2], rows[1:120:2], strict=True)).to_list()
    server = ScriptedServer(
        *restating_scripts(rows), slots=16, latency_s=0.2, serves_info=False, serves_queue_metrics=True
    )
    readings = {"n": 0}
    metrics = server._metrics

    async def counted(request):
        readings["n"] += 1
        return await metrics(request)

    server._metrics = counted  # type: ignore[method-assign]
    server.start()
    config = MergeItConfig(**{**FAST.to_dict(), "model": "scripted/merge-model"})
    merger = Merger(endpoint=server.url, config=config, cache_dir=str(tmp_path))

    async def scenario():
        async with merger.session() as session:
            batch = await merger.merge_with(session, pairs, merger.templates(), window="auto")
            watch = session.merges.backend._watch
            task = watch._task
        return batch, task

    try:
        batch, task = asyncio.run(scenario())
    finally:
        server.stop()
    assert {o.status for o in batch.outcomes} == {"accepted"}
    assert readings["n"] > 1 and task.done()  # read during the stage; the watcher ended with the session
    assert max(server.held) > 16  # the limit grew past the slots, saw requests wait, ...
    peak = int(batch.endpoints["merge"]["concurrency"].split(", ")[1].split()[0])
    assert peak <= 8 * 16  # ... and was brought back to what the server runs, not doubled on and on


def test_a_window_that_follows_a_limit_starts_more_work_as_soon_as_the_limit_grows():
    limit = {"now": 2}
    started: list[int] = []
    release = asyncio.Event()

    async def work(item: int) -> int:
        started.append(item)
        await release.wait()
        return item

    async def scenario() -> list[int]:
        task = asyncio.ensure_future(map_windowed(work, range(10), lambda: limit["now"]))
        await asyncio.sleep(0.01)
        assert len(started) == 2
        limit["now"] = 6  # the limit doubled twice while nothing finished
        for _ in range(100):
            await asyncio.sleep(0.02)
            if len(started) == 6:
                break
        assert len(started) == 6
        release.set()
        return await task

    assert asyncio.run(scenario()) == list(range(10))


def test_connections_are_spread_over_small_pools_unless_a_proxy_is_set(monkeypatch):
    assert pool_sizes(128) == [8] * 16
    assert pool_sizes(20) == [7, 7, 7] and pool_sizes(1) == [1]
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)

    async def session_transport() -> object:
        backend = InferenceClientBackend("m", None, url="http://127.0.0.1:9")
        await backend.size_pool(128)
        session = backend._client._async_client
        transport = session._transport
        await backend.aclose()
        return transport

    transport = asyncio.run(session_transport())
    assert isinstance(transport, SpreadTransport) and transport.pools == 16
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert not isinstance(asyncio.run(session_transport()), SpreadTransport)


def test_the_request_cache_commits_without_waiting_for_the_disk(tmp_path):
    cache = RequestCache(tmp_path)
    cache.put("k", {"p": 1}, {"r": 2})
    assert cache._connection is not None
    assert cache._connection.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL (WAL keeps it safe)
    cache.close()
    # committed: another connection reads it at once
    other = sqlite3.connect(tmp_path / "requests.sqlite3")
    assert other.execute("SELECT COUNT(*) FROM responses").fetchone()[0] == 1
    other.close()


_WRITER = (
    "import sys; from mergeit_hf.endpoints.sending.shared_cache import SharedRequestCache; "
    "cache = SharedRequestCache(sys.argv[1]); "
    "[cache.put(f'{sys.argv[2]}-{i}', {'i': i}, {'text': 'x' * (i * 37 % 5000)}) for i in range(300)]; cache.close()"
)


def test_the_shared_cache_takes_many_writers_at_once_and_skips_what_a_killed_one_left_unfinished(tmp_path):
    """The Ray engine's cache (issue 25): writers in processes of their own, all at once, each in a file of
    its own; a cache opened afterwards finds every answer, and a line cut short by a kill is skipped."""
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), name]) for name in "abc"]
    assert [writer.wait() for writer in writers] == [0, 0, 0]
    shards = sorted(tmp_path.glob("requests.*.jsonl"))
    assert len(shards) == 3 and not (tmp_path / "requests.sqlite3").exists()
    with shards[0].open("ab") as torn:  # a writer killed in the middle of a line
        torn.write(b'{"key": "a-torn", "response": {"te')
    reader = SharedRequestCache(tmp_path)
    assert reader.torn_lines == 1 and reader.get("a-torn") is None
    assert [reader.get(f"{name}-{i}") for name in "abc" for i in range(300)] == [
        {"text": "x" * (i * 37 % 5000)} for _ in "abc" for i in range(300)
    ]
    reader.put("d-0", {"i": 0}, {"text": "new"})  # appended to a file of the reader's own
    assert reader.get("d-0") == {"text": "new"} and len(list(tmp_path.glob("requests.*.jsonl"))) == 4
    reader.close()
    assert SharedRequestCache(tmp_path).get("d-0") == {"text": "new"}
    assert SharedRequestCache(None).get("d-0") is None


def _sibling(folder, endpoint: str) -> subprocess.Popen:
    """Another process of this machine registered as sending to ``endpoint`` (as a map worker's session is)."""
    code = (
        "import sys, time, pathlib; from mergeit_hf.endpoints.sending.senders import Senders; "
        "Senders(pathlib.Path(sys.argv[1]), sys.argv[2]); print('ready', flush=True); time.sleep(600)"
    )
    child = subprocess.Popen([sys.executable, "-c", code, str(folder), endpoint], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    return child


def test_senders_count_live_processes_and_forget_dead_ones(tmp_path):
    mine = Senders(tmp_path, "http://server")
    assert mine.count() == 1
    sibling = _sibling(tmp_path, "http://server")
    other_endpoint = _sibling(tmp_path, "http://elsewhere")
    try:
        assert mine.count() == 2
        sibling.kill()
        sibling.wait()
        assert mine.count() == 1  # a killed worker's entry goes
        late = _sibling(tmp_path, "http://server")
        assert mine.count() == 2
        with sqlite3.connect(tmp_path / "senders.sqlite3") as db:  # it has sent nothing for a minute
            db.execute("UPDATE senders SET seen = seen - 60 WHERE pid = ?", (late.pid,))
        assert mine.count() == 1  # a live process that stopped sending takes no share
        late.kill()
        late.wait()
    finally:
        other_endpoint.kill()
        other_endpoint.wait()
        asyncio.run(mine.aclose())


def test_a_limit_the_server_announces_is_split_with_another_process_sending_to_it(rows, tmp_path):
    """TGI-shaped, 8 slots: with a sibling process registered (a second ``num_proc`` worker), this one
    holds at most 4 at once, and the record says the limit was shared."""
    pairs = pairs_dataset(*zip(rows[0:80:2], rows[1:80:2], strict=True))
    server = ScriptedServer(*restating_scripts(rows), slots=8, latency_s=0.05).start()
    sibling = _sibling(tmp_path, server.url)
    try:
        merger = Merger(endpoint=server.url, config=FAST, cache_dir=str(tmp_path))
        merged, batch = merge_stage(pairs, merger)
        alone = Merger(endpoint=server.url, config=FAST, cache_dir=str(tmp_path / "alone"))
        held_shared = max(server.held)
        server.held.clear()
        merge_stage(pairs, alone)
    finally:
        sibling.kill()
        sibling.wait()
        server.stop()
    assert set(merged["merge_status"]) == {"accepted"}
    assert held_shared <= 4 < max(server.held) <= 8
    assert batch.endpoints["merge"]["concurrency"] == "fixed, 8 at most, shared by up to 2 processes"
