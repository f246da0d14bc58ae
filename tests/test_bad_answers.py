"""Issue 24: a bad answer from a server fails one request or one pair with its reason, never the run; every
finished run can be re-gated.

The malformed answers are what gateways and proxies send under load with status 200 (an HTML page, an
error object, no choices, JSON cut in half), served by the scripted server; each defect fixed has its test.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import httpx
import pytest
from datasets import Dataset

from mergeit_hf import MergeItConfig
from mergeit_hf.endpoints.http.client import Posted
from mergeit_hf.endpoints.probe import ServerInfo
from mergeit_hf.endpoints.sending.sync import run_sync
from mergeit_hf.endpoints.sending.window import map_windowed
from mergeit_hf.endpoints.servers import local_llama
from mergeit_hf.endpoints.servers.completions import CompletionEndpointBackend
from mergeit_hf.endpoints.servers.local_llama import LocalLlamaBackend
from mergeit_hf.engines.datasets_engine import merge_stage
from mergeit_hf.errors import ConfigError, EndpointError
from mergeit_hf.inputs.loading import load_rows
from mergeit_hf.output.folder import OutputFolder
from mergeit_hf.run import finish, pipeline
from mergeit_hf.run.cli import main
from mergeit_hf.stage2.merge.merger import Merger
from mergeit_hf.stage2.prefilter import UNSCORED_REASON, prefilter
from mergeit_hf.stage2.retention.measure import RetentionTexts
from tests.conftest import shared
from tests.helpers.pairs import FAST, cli_run, pairs_dataset, real_rows, restating_scripts
from tests.helpers.scripted import MALFORMED, ScriptedServer, peaked


@pytest.fixture(scope="module")
def rows():
    return real_rows("gpteacher_roleplay.json", list(range(40)))


@pytest.fixture(scope="module")
def pairs(rows):
    return pairs_dataset(*zip(rows[::2], rows[1::2], strict=True))


def _served(rows, **options) -> ScriptedServer:
    return ScriptedServer(*restating_scripts(rows), **options).start()


def _merger(server, tmp_path, **config) -> Merger:
    return Merger(endpoint=server.url, config=MergeItConfig(**{**FAST.to_dict(), **config}), cache_dir=str(tmp_path))


SAID = {
    "html page": "(text/html; charset=utf-8) with a body that is not JSON: '<html>",
    "empty choices": "(application/json; charset=utf-8) with JSON that lacks an entry (an empty list)",
    "error object": "(application/json; charset=utf-8) with an error object (upstream overloaded)",
    "json cut in half": "(application/json; charset=utf-8) with a body that is not JSON: '{",
}


@pytest.mark.parametrize("kind", MALFORMED)
def test_a_malformed_answer_is_retried_then_fails_that_request_saying_what_came_back(kind, rows, pairs, tmp_path):
    # A vLLM-shaped server (no /info): answers read by our own client, which sees status and content type.
    server = _served(rows, malformed_every=1, malformed_kinds=(kind,), serves_info=False)
    config = {"request_retries": 2, "model": "scripted/merge-model"}
    try:
        merged, _ = merge_stage(pairs.select(range(2)), _merger(server, tmp_path, **config))
    finally:
        server.stop()
    assert merged["merge_status"] == ["failed", "failed"]
    reason = merged["merge_reason"][0]
    assert f"answered HTTP 200 {SAID[kind]}" in reason and "(after retries)" in reason, reason
    assert server.malformed_sent[kind] >= 2 * 2  # two pairs, each request tried twice


@pytest.mark.parametrize("kind", ["html page", "json cut in half", "empty choices", "error object"])
def test_through_huggingface_hubs_client_too(kind, rows, pairs, tmp_path):
    server = _served(rows, malformed_every=1, malformed_kinds=(kind,))  # TGI-shaped: /info
    try:
        merged, _ = merge_stage(pairs.select(range(1)), _merger(server, tmp_path, request_retries=2))
    finally:
        server.stop()
    assert merged["merge_status"] == ["failed"]
    reason = merged["merge_reason"][0]
    said = {"html page": "not JSON: '<html>", "json cut in half": "not JSON: '{", "empty choices": "lacks an entry"}
    assert said.get(kind, "upstream overloaded") in reason and "(after retries)" in reason, reason


def test_2500_real_rows_against_a_128_slot_server_malformed_5_percent_of_the_time(tmp_path):
    rows = real_rows("gpteacher_toolformer.json", list(range(2500)))
    server = ScriptedServer(*restating_scripts(rows), slots=128, malformed_every=20).start()
    try:
        out = cli_run(tmp_path, rows, server.url, "scorer_check_rows: 8\n")
    finally:
        server.stop()
    assert set(server.malformed_sent) == set(MALFORMED)  # every kind was served
    folder = OutputFolder.open(out)
    statuses = folder.pairs["merge_status"]
    assert len(statuses) > 50 and set(statuses) <= {"accepted", "rejected", "failed"}
    failed = [r for s, r in zip(statuses, folder.pairs["merge_reason"], strict=True) if s == "failed"]
    assert len(failed) <= 0.02 * len(statuses), failed
    assert all("answered HTTP 200" in reason for reason in failed), failed
    accounting = folder.accounting
    assert sorted(accounting["source_index"]) == list(range(2500))  # every input row accounted for

    healthy = ScriptedServer(*restating_scripts(rows), slots=128).start()
    try:
        cli_run(tmp_path, rows, healthy.url, "scorer_check_rows: 8\n", output="again")
    finally:
        healthy.stop()
    # Only what had failed is sent again: at most a merge and its three scores per failed pair.
    assert sum(healthy.requests.values()) <= 4 * len(failed)


def test_an_unexpected_error_in_one_pair_fails_that_pair_only(rows, pairs, tmp_path, monkeypatch):
    measure = RetentionTexts.measure
    victim = pairs["a_instruction"][1]

    def flaky(self, vectors):
        if self.sources[0]["instruction"] == victim:
            raise RuntimeError("a bug in one pair")
        return measure(self, vectors)

    monkeypatch.setattr(RetentionTexts, "measure", flaky)
    server = _served(rows)
    try:
        merged, _ = merge_stage(pairs.select(range(4)), _merger(server, tmp_path, compute_retention=True))
    finally:
        server.stop()
    assert merged["merge_status"][1] == "failed"
    assert merged["merge_reason"][1] == "unexpected error: RuntimeError: a bug in one pair"
    assert [s for i, s in enumerate(merged["merge_status"]) if i != 1] == ["accepted"] * 3


def test_map_batches_whose_first_pairs_all_fail_keep_their_types(rows, pairs, tmp_path):
    merge, score = restating_scripts(rows)
    first_batch = set(pairs["a_instruction"][:3])

    def failing_first(prompt: str, body: dict) -> dict:
        if any(instruction.split("\n")[0] in prompt for instruction in first_batch):
            return {"not": "a merge"}
        return merge(prompt, body)

    server = ScriptedServer(failing_first, score).start()
    try:
        merged = pairs.select(range(9)).map(
            _merger(server, tmp_path, parse_retries=0, compute_retention=True), batched=True, batch_size=3
        )
    finally:
        server.stop()
    assert merged["merge_status"] == ["failed"] * 3 + ["accepted"] * 6
    assert merged.features["quality_merged"].dtype == "float64"
    assert merged["quality_merged"][3] is not None and merged["retention_more"][3] == []
    # what finish() makes of it: a missing number is None, whichever batch it came from
    from mergeit_hf.run.finish import missing_as_none

    cleaned = missing_as_none(merged)
    assert cleaned["quality_merged"][:3] == [None] * 3 and cleaned["quality_merged"][3] is not None


def test_an_informational_complexity_that_fails_keeps_the_accepted_merge(rows, pairs, tmp_path):
    server = _served(rows)  # no complexity script: complexity requests answer 400
    try:
        merged, _ = merge_stage(pairs.select(range(2)), _merger(server, tmp_path, complexity_scores=True))
    finally:
        server.stop()
    assert merged["merge_status"] == ["accepted", "accepted"]
    assert "complexity not recorded: endpoint error: scoring the complexity of a" in merged["merge_reason"][0]
    assert merged["complexity_merged"] == [None, None]


def test_a_failure_on_a_re_merge_keeps_the_earlier_attempts(rows, pairs, tmp_path):
    merge, _ = restating_scripts(rows)
    merges = []

    def second_differs(prompt: str, body: dict) -> dict:
        merges.append(prompt)
        merged = merge(prompt, body)
        return {**merged, "output": merged["output"] + " (again)"} if len(merges) > 1 else merged

    def score(instruction: str, output: str) -> dict[str, float]:
        if output.endswith("(again)"):
            raise ValueError("the scorer breaks on this one")  # the server answers 500, after retries too
        return peaked(3)  # the first merge scores as its sources do: rejected by the gate

    server = ScriptedServer(second_differs, score).start()
    try:
        merged, _ = merge_stage(pairs.select(range(1)), _merger(server, tmp_path, gate_retries=1, request_retries=1))
    finally:
        server.stop()
    assert merged["merge_status"] == ["rejected"]  # decided on the first attempt, which was scored
    log = json.loads(merged["attempt_log"][0])
    assert len(log) == 2 and log[0]["quality_merged"] is not None
    assert log[1]["error"].startswith("endpoint error: scoring merged")


def test_regate_and_sweep_on_a_run_without_retention_or_judge(rows, tmp_path, capsys):
    server = _served(rows)
    try:
        out = cli_run(
            tmp_path,
            rows,
            server.url,
            "n_clusters: 2\nselection_budget: 1.0\ntau: 0.3\n"
            "compute_retention: false\nmin_retention: 0\nscorer_check_rows: 0\n",
        )
    finally:
        server.stop()
    assert main(["regate", str(out), "--alpha", "0.9"]) == 0
    assert main(["sweep", str(out)]) == 0
    capsys.readouterr()
    assert main(["regate", str(out), "--min-judge", "0.8"]) == 2
    assert main(["sweep", str(out), "--min-judge", "0.8"]) == 2
    assert main(["regate", str(out), "--min-retention", "0.5"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and "no judge verdicts" in errors[0] and "measured no retention" in errors[2], errors


def test_two_models_of_one_file_name_never_share_answers(tmp_path, monkeypatch):
    for name, content in (("one", b"GGUF one"), ("two", b"GGUF two")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.gguf").write_bytes(content * 1000)
    one, two = (LocalLlamaBackend(tmp_path / name / "model.gguf") for name in ("one", "two"))
    assert one.model_id != two.model_id  # what the request cache keys on
    assert one.describe()["model"] == two.describe()["model"] == "model.gguf"  # what the card shows


def test_the_embedded_model_refusing_a_prompt_fails_that_request(tmp_path, monkeypatch):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")

    class TooLong:
        def create_chat_completion(self, **_):
            raise ValueError("Requested tokens (5000) exceed context window of 4096")

    monkeypatch.setattr(local_llama, "_load_llama", lambda path, n_ctx: TooLong())
    backend = LocalLlamaBackend(tmp_path / "model.gguf")
    with pytest.raises(EndpointError, match="refused the request: Requested tokens"):
        run_sync(backend.chat([{"role": "user", "content": "x"}], {}))


class _StubHttp:
    """Answers /v1/completions with logprobs once, then without: the route must stay settled."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    async def post(self, path, body, answered=None, read=None):
        self.paths.append(path)
        logprobs = {"top_logprobs": [{"4": -0.1, "5": -2.0}]} if len(self.paths) == 1 else None
        answer = {"choices": [{"text": "4", "logprobs": logprobs, "finish_reason": "length"}]}
        return Posted(httpx.Response(200, json=answer), read(answer))

    def check(self, path, response) -> None:
        return None


def test_the_scorer_route_stays_settled_after_an_answer_without_logprobs():
    http = _StubHttp()
    backend = CompletionEndpointBackend("http://scorer", ServerInfo("m", 4, "openai"), http)  # type: ignore[arg-type]
    params = {"logprobs": True, "top_logprobs": 6, "max_tokens": 1}
    first = run_sync(backend.complete("p", params))
    second = run_sync(backend.complete("p", params))
    assert first.first_top_logprobs and not second.first_top_logprobs  # an unavailable score, counted as such
    assert backend.route == "/v1/completions" and http.paths == ["/v1/completions"] * 2


def test_the_cache_closes_after_the_backends(rows, tmp_path, monkeypatch):
    from mergeit_hf.endpoints.sending.request_cache import RequestCache
    from mergeit_hf.endpoints.servers.hf_inference import InferenceClientBackend

    order: list[str] = []
    close, aclose = RequestCache.close, InferenceClientBackend.aclose
    monkeypatch.setattr(RequestCache, "close", lambda self: (order.append("cache"), close(self))[1])

    async def backend_closed(self):
        order.append("backend")
        await aclose(self)

    monkeypatch.setattr(InferenceClientBackend, "aclose", backend_closed)
    server = _served(rows)
    try:
        merge_stage(pairs_dataset((rows[0], rows[1])), _merger(server, tmp_path))
    finally:
        server.stop()
    assert order == ["backend", "cache"]


def test_two_processes_distilling_the_static_model_at_once_both_succeed(tmp_path):
    from mergeit_hf.embeddings.static import publish_folder

    class Model:
        def __init__(self, tag: str) -> None:
            self.tag = tag

        def save_pretrained(self, path: str) -> None:
            Path(path).mkdir(parents=True, exist_ok=True)
            (Path(path) / "model.safetensors").write_text(self.tag)

    folder = tmp_path / "static" / "minilm-0123"
    publish_folder(Model("first"), folder)
    publish_folder(Model("second"), folder)  # lost the race: keeps the first copy, raises nothing
    assert (folder / "model.safetensors").read_text() == "first"
    assert [p.name for p in folder.parent.iterdir()] == ["minilm-0123"]  # no temporary folder left


def test_a_mistyped_preset_is_named():
    with pytest.raises(
        ConfigError, match="preset must be one of \\['paper', 'authors_scripts'\\], got 'author_scripts'"
    ):
        MergeItConfig.from_dict({"preset": "author_scripts"})


def test_the_prefilter_keeps_a_window_and_leaves_out_unscored_rows_with_their_reason():
    import asyncio

    running, most = 0, 0

    async def work(item: int) -> int:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.001)
        running -= 1
        return item * 2

    assert run_sync(map_windowed(work, range(100), 8)) == [i * 2 for i in range(100)]
    assert most == 8

    rows, _ = load_rows(shared("gpteacher_roleplay.json"))
    rows = rows.select(range(6))
    result = prefilter(
        rows,
        [3.0, 4.0, None, 2.0, 5.0, 1.0],
        [2.0, 2.0, None, 2.0, 2.0, 2.0],
        2,
        0,
        {2: "scoring the quality failed: answered HTTP 200 (text/html)"},
    )
    assert len(result.kept) == 2 and result.n_unscored == 1
    unscored = [d for d in result.dropped if d.reason == UNSCORED_REASON]
    assert len(unscored) == 1 and "text/html" in unscored[0].detail
    assert len(result.dropped) == 4  # every row not kept is accounted for


def test_the_published_config_names_no_url_and_no_local_path():
    config = MergeItConfig(
        judge=True,
        judge_endpoint="http://10.1.2.3:8000",
        scorer_endpoint="http://gpu-7.internal:8080",
        local_model="/home/alice/models/qwen.gguf",
        retention_model="/home/alice/minilm",
    )
    recorded = finish._recorded_config(config)
    assert recorded["judge_endpoint"] == recorded["scorer_endpoint"] == "URL"
    assert recorded["local_model"] == "qwen.gguf" and recorded["retention_model"] == "minilm"
    assert "alice" not in json.dumps(recorded) and "10.1.2.3" not in json.dumps(recorded)


def test_a_broken_json_line_is_counted_once_not_logged_by_datasets(tmp_path, caplog):
    path = tmp_path / "rows.jsonl"
    good = json.dumps({"instruction": "Say hi", "input": "", "output": "Hi"})
    path.write_text(f"{good}\n{{broken\n{json.dumps({'instruction': 'Say bye', 'input': '', 'output': 'Bye'})}\n")
    with caplog.at_level(logging.INFO):
        rows, report = load_rows(path)
    assert len(rows) == 2 and "line 2" in report.unreadable_detail, report.unreadable_detail
    assert not [r for r in caplog.records if r.name.startswith("datasets") and r.levelno >= logging.ERROR]


def test_the_accounting_is_built_without_a_deprecation_warning(tmp_path):
    import pyarrow as pa

    from mergeit_hf.inputs.loading import LoadReport
    from mergeit_hf.output.assemble import ACCOUNTING_FEATURES, _accounting

    rows = Dataset.from_dict({"id": ["b", "a"], "source_index": [1, 0], "selected": [False, False]})
    no_fates = pa.table({name: pa.array([], pa.string()) for name in ("id", "fate", "detail", "output_id")})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        accounting = _accounting(rows, LoadReport(source="x", input_format="alpaca"), no_fates, [])
    assert accounting["source_index"] == [0, 1] and accounting.features == ACCOUNTING_FEATURES


def test_the_load_report_comes_before_stage_1(tmp_path, monkeypatch):
    seen: list[str] = []
    monkeypatch.setattr(pipeline.Engine, "run_stage1", lambda self, rows, config: seen.append("stage 1") or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        pipeline.run_pipeline(shared("gpteacher_roleplay.json"), on_loaded=lambda report: seen.append("loaded"))
    assert seen == ["loaded", "stage 1"]


def test_a_scorer_check_request_that_fails_counts_as_wrong_not_as_a_stop(rows, tmp_path):
    from mergeit_hf.stage2.scorer_check import run_scorer_check

    server = _served(rows, malformed_every=5)
    try:
        check = run_scorer_check(rows[:8], _merger(server, tmp_path, request_retries=1), n_rows=8)
    finally:
        server.stop()
    assert check.failed > 0 and check.to_dict()["failed"] == check.failed
    assert "failed after retries (counted as wrong)" in check.report()
