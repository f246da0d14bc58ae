"""Issue 27: stage 2 through OpenAI-compatible batch APIs, in rounds over the request cache.

Against a scripted Batch API (``tests/helpers/batch_server.py``) whose lines are answered by the same scripted
model as its synchronous route: a ``--batch`` run ends with the rows, statuses and accounting of a synchronous
run; a client killed while a batch is in progress resumes it without a second batch; an expired batch and
failed lines end with every pair decided and only the failed lines sent again.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from mergeit_hf import MergeItConfig
from mergeit_hf.endpoints.batch.api import BatchApi, BatchInfo
from mergeit_hf.endpoints.batch.limits import BatchLimits
from mergeit_hf.endpoints.batch.rounds import BatchRounds
from mergeit_hf.endpoints.batch.state import BatchState, RoundRecord, SubmittedFile
from mergeit_hf.endpoints.sending.request_cache import RequestCache
from mergeit_hf.errors import ConfigError, EndpointConfigError, EndpointError
from mergeit_hf.output.folder import OutputFolder
from mergeit_hf.run.cli import main
from tests.helpers.batch_server import ScriptedBatchServer
from tests.helpers.pairs import real_rows, restate_all
from tests.helpers.scripted import ScriptedServer, peaked

PROJECT = Path(__file__).resolve().parents[1]
CONFIG = "scorer_check_rows: 8\nbatch_poll_s: 0.01\nrequest_retries: 3\n"
STATUSES = {"accepted", "rejected", "failed"}


def scripts(rows: list[dict]):
    """A merge that restates the sources its prompt quotes (found by their whole instruction); merges score 6
    or, for every third pair, 2 (the gate rejects those); sources score 3."""
    instructions = [(row["instruction"], row) for row in rows]

    def merge(prompt: str, body: dict) -> dict:
        found = sorted((prompt.find(text), -len(text), i) for i, (text, _) in enumerate(instructions) if text in prompt)
        chosen = [instructions[i][1] for _, _, i in found][:2]
        return restate_all(*chosen)

    def score(instruction: str, output: str) -> dict[str, float]:
        if "as a second task" not in instruction:
            return peaked(3)
        return peaked(2) if len(instruction) % 3 == 0 else peaked(6)

    return merge, score


def _run(folder: Path, rows_path: Path, endpoint: str, *flags: str, output: str = "out") -> Path:
    config = folder / "config.yaml"
    config.write_text(CONFIG)
    args = ["run", str(rows_path), "--output", str(folder / output), "--endpoint", endpoint, "--config", str(config)]
    assert main([*args, "--cache-dir", str(folder / f"cache-{output}"), *flags]) == 0
    return folder / output


def _run_and_stop(server: ScriptedServer, folder: Path, rows_path: Path, *flags: str) -> tuple[Path, OutputFolder]:
    """A run against ``server`` (stopped after it), and its output folder."""
    try:
        out = _run(folder, rows_path, server.url, *flags)
    finally:
        server.stop()
    return out, OutputFolder.open(out)


def _rows_file(folder: Path, count: int) -> tuple[list[dict], Path]:
    rows = real_rows("gpteacher_toolformer.json", list(range(count)))
    path = folder / "rows.json"
    path.write_text(json.dumps(rows))
    return rows, path


def _without_times(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in ("merged_at", "created_at")} for row in rows]


def test_a_batch_run_gives_the_rows_statuses_and_accounting_of_a_synchronous_run(tmp_path):
    rows, rows_path = _rows_file(tmp_path, 2500)
    synchronous = ScriptedServer(*scripts(rows), slots=64, serves_info=False).start()
    batch = ScriptedBatchServer(*scripts(rows), slots=64).start()
    try:
        # The synchronous server names its model like the batch one (no /info): pass it
        sync_out = _run(tmp_path, rows_path, synchronous.url, "--model", batch.model_id, output="sync")
        batch_out = _run(tmp_path, rows_path, batch.url, "--batch", output="batch")
    finally:
        synchronous.stop()
        batch.stop()
    sync, batched = OutputFolder.open(sync_out), OutputFolder.open(batch_out)
    statuses = Counter(batched.pairs["merge_status"])
    assert set(statuses) <= STATUSES and statuses["accepted"] > 50 and statuses["rejected"] > 10, statuses
    assert _without_times(batched.final.to_list()) == _without_times(sync.final.to_list())
    keep = ["pair_id", "merge_status", "merge_reason", "quality_merged", "quality_a", "quality_b", "merged_output"]
    assert batched.pairs.select_columns(keep).to_list() == sync.pairs.select_columns(keep).to_list()
    assert batched.accounting.to_list() == sync.accounting.to_list()
    assert batched.record.counts == sync.record.counts
    # Nothing went synchronously but the scorer check; every batch line was answered once
    assert batched.record.requests["by_role"] == {"scorer check": sync.record.requests["by_role"]["scorer check"]}
    summary = batched.record.batch
    assert summary["rounds"] == 2 and summary["failed_lines"] == 0 and summary["unanswered"] == 0
    assert summary["requests"] == sum(batch.lines_answered.values()) == len(batch.lines_answered)
    assert batch.requests["merge"] == sync.record.counts["pairs"] == synchronous.requests["merge"]
    assert sum(r["prompt_tokens"] for r in summary["by_round"]) == summary["answered"]  # 1 a reply, scripted
    card = (batch_out / "README.md").read_text()
    assert "Stage 2 through the endpoint's batch API: 2 round(s)" in card


def test_a_client_killed_while_its_batch_runs_resumes_that_batch_and_merges_every_pair_once(tmp_path):
    rows, rows_path = _rows_file(tmp_path, 400)
    server = ScriptedBatchServer(*scripts(rows), slots=8).start()
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.replace("batch_poll_s: 0.01", "batch_poll_s: 0.3"))
    out, cache = tmp_path / "out", tmp_path / "cache"
    command = [
        sys.executable,
        "-m",
        "mergeit_hf",
        "run",
        str(rows_path),
        "--output",
        str(out),
        "--endpoint",
        server.url,
        "--config",
        str(config),
        "--cache-dir",
        str(cache),
        "--batch",
    ]
    try:
        client = subprocess.Popen(command, cwd=PROJECT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 300
        while not any(b["status"] == "in_progress" for b in server.batches.values()):
            assert client.poll() is None, client.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no batch in progress after 300 s"
            time.sleep(0.05)
        client.send_signal(signal.SIGKILL)
        client.wait()
        assert len(server.batches) == 1 and server.requests["merge"] == 0  # killed mid-round, nothing answered

        status = subprocess.run(
            [sys.executable, "-m", "mergeit_hf", "batch-status", str(out)],
            cwd=PROJECT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "round 1 (in flight)" in status and "the provider says batch_" in status, status

        config.write_text(CONFIG)
        args = ["run", str(rows_path), "--output", str(out), "--endpoint", server.url, "--config", str(config)]
        assert main([*args, "--cache-dir", str(cache), "--batch"]) == 0
    finally:
        server.stop()
    created = [b["metadata"]["mergeit_round"] for b in server.batches.values()]
    assert created == ["1", "2"]  # round 1 resumed, not submitted twice
    merged = OutputFolder.open(out)
    assert set(merged.pairs["merge_status"]) <= STATUSES
    assert server.requests["merge"] == len(merged.pairs)  # every pair merged once
    assert set(server.lines_answered.values()) == {1}


def test_a_client_stopped_between_rounds_submits_the_next_round_once_when_started_again(tmp_path, monkeypatch):
    rows, rows_path = _rows_file(tmp_path, 400)
    server = ScriptedBatchServer(*scripts(rows), slots=8).start()
    submit = BatchRounds.submit

    def stopped_before_round_2(self: BatchRounds, collector) -> RoundRecord:
        if self.state.rounds:  # round 1 is answered and in the cache: the user stops the client here
            raise KeyboardInterrupt
        return submit(self, collector)

    try:
        monkeypatch.setattr(BatchRounds, "submit", stopped_before_round_2)
        config = tmp_path / "config.yaml"
        config.write_text(CONFIG)
        args = ["run", str(rows_path), "--output", str(tmp_path / "out"), "--endpoint", server.url, "--batch"]
        args += ["--config", str(config), "--cache-dir", str(tmp_path / "cache")]
        assert main(args) == 130
        assert [b["metadata"]["mergeit_round"] for b in server.batches.values()] == ["1"]
        monkeypatch.setattr(BatchRounds, "submit", submit)
        assert main(args) == 0
    finally:
        server.stop()
    assert [b["metadata"]["mergeit_round"] for b in server.batches.values()] == ["1", "2"]
    merged = OutputFolder.open(tmp_path / "out")
    assert set(merged.pairs["merge_status"]) <= STATUSES and merged.record.batch["rounds"] == 2
    assert set(server.lines_answered.values()) == {1} and server.requests["merge"] == len(merged.pairs)


def test_an_expired_batch_and_failed_lines_end_with_every_pair_decided_and_only_those_sent_again(tmp_path, monkeypatch):
    rows, rows_path = _rows_file(tmp_path, 400)
    monkeypatch.setenv("MERGEIT_API_KEY", "sk-batch-test")  # every route refuses a request without it
    server = ScriptedBatchServer(*scripts(rows), slots=8, required_key="sk-batch-test").start()
    server.expire_next, server.fail_next_lines = True, 5  # the first batch: half answered, five of those failed
    _out, merged = _run_and_stop(server, tmp_path, rows_path, "--batch")
    assert set(merged.pairs["merge_status"]) <= STATUSES and len(merged.pairs) > 10
    summary = merged.record.batch
    first = summary["by_round"][0]
    assert first["failed_lines"] == 5 and first["unanswered"] == first["requests"] - first["requests"] // 2
    again = {key for key, times in server.lines_answered.items() if times > 1}
    assert len(again) == 5  # only the failed lines were answered twice; the expired half went once, later
    assert sorted(merged.accounting["source_index"]) == list(range(len(rows)))  # every row accounted for


def test_lines_refused_for_their_response_format_step_down_the_form_and_are_not_attempts(tmp_path):
    rows, rows_path = _rows_file(tmp_path, 400)
    refused = frozenset({"json_schema", "json_object+schema"})  # a model taking plain json_object only
    server = ScriptedBatchServer(*scripts(rows), slots=8, refused_formats=refused).start()
    out, merged = _run_and_stop(server, tmp_path, rows_path, "--batch")
    statuses = Counter(merged.pairs["merge_status"])
    assert set(statuses) <= {"accepted", "rejected"} and statuses["accepted"] > 5, statuses
    summary = merged.record.batch
    first, second = summary["by_round"][:2]
    assert (first["structured_output"], second["structured_output"]) == ("json_schema", "json_object+schema")
    assert first["format_refused"] == server.requests["refused json_schema"] == len(merged.pairs)
    assert second["format_refused"] == server.requests["refused json_object+schema"] == len(merged.pairs)
    assert summary["structured_output"] == "json_object" and summary["failed_lines"] == summary["given_up"] == 0
    saved = json.loads((out / "batch" / "state.json").read_text())  # what a resumed run reads
    assert saved["attempts"] == {} and (saved["structured_output"], saved["format_settled"]) == ("json_object", True)
    assert server.requests["merge"] >= len(merged.pairs)  # every pair merged, in the form the model takes
    assert "refused for their response_format and sent again as json_object" in (out / "README.md").read_text()


def test_a_format_refusal_once_a_line_in_that_form_was_answered_is_the_lines_own_failure(tmp_path):
    state, record, part = _one_part_round(tmp_path, ["a"], "completed")
    state.format_settled = True
    (state.folder / "round-1-part-1.payloads.jsonl").write_text(
        json.dumps({"key": "a", "payload": {"params": {"response_format": {"type": "json_schema"}}}}) + "\n"
    )
    error = {"error": {"message": "Invalid parameter: 'response_format' of type 'json_schema' is not supported"}}
    refused = {"custom_id": "a", "response": {"status_code": 400, "body": error}, "error": None}

    class Api:
        async def content(self, file_id: str) -> str:
            return json.dumps(refused) + "\n"

    batch = BatchInfo("batch-1", "completed", "file-in", None, "file-err", {}, "")
    rounds = BatchRounds(Api(), state, RequestCache(tmp_path / "cache"), retries=3)  # type: ignore[arg-type]
    asyncio.run(rounds._ingest(record, part, batch))
    assert (record.format_refused, record.failed_lines, state.attempts) == (0, 1, {"a": 1})
    assert state.structured_output == "json_schema"  # settled: the form stays


def test_a_round_above_the_enqueued_token_limit_goes_in_files_under_it_one_batch_at_a_time(tmp_path):
    rows, rows_path = _rows_file(tmp_path, 400)
    limit = 6000  # the server's count of input tokens its queue takes; the config states it
    server = ScriptedBatchServer(*scripts(rows), slots=8, enqueued_token_limit=limit).start()
    out, merged = _run_and_stop(server, tmp_path, rows_path, "--batch", "--batch-enqueued-tokens", str(limit))
    assert set(merged.pairs["merge_status"]) <= STATUSES and len(merged.pairs) > 10
    summary = merged.record.batch
    first = summary["by_round"][0]
    assert len(first["batches"]) >= 3  # the round went in several files ...
    assert server.queue_refusals == 0 and 0 < server.queue_peak <= limit  # ... the queue never held more
    assert server.most_batches_queued == 1  # one batch at a time
    assert summary["queue_refused"] == 0 and summary["enqueued_token_limit"] == limit
    assert set(server.lines_answered.values()) == {1}  # every line answered once
    assert server.requests["merge"] == len(merged.pairs)
    assert f"files kept under {limit} enqueued tokens and sent one at a time" in (out / "README.md").read_text()


def test_a_batch_refused_for_a_full_queue_is_created_again_and_the_run_ends_as_usual(tmp_path):
    rows, rows_path = _rows_file(tmp_path, 400)
    server = ScriptedBatchServer(*scripts(rows), slots=8).start()
    server.refuse_queue_next = 2  # other jobs of the account hold the queue for the next two batches
    out, merged = _run_and_stop(server, tmp_path, rows_path, "--batch")
    summary = merged.record.batch
    assert summary["by_round"][0]["queue_refused"] == 2 and summary["queue_refused"] == 2
    assert summary["failed_lines"] == summary["unanswered"] == 0
    assert len(server.batches) == summary["rounds"] + 2  # the refused file created again, nothing else
    assert set(server.lines_answered.values()) == {1} and server.requests["merge"] == len(merged.pairs)
    assert "2 batch(es) refused for the enqueued-token limit and created again" in (out / "README.md").read_text()


def test_a_file_the_queue_never_takes_stops_the_run_naming_the_setting_which_then_resumes_it(tmp_path, capsys):
    rows, rows_path = _rows_file(tmp_path, 400)
    server = ScriptedBatchServer(*scripts(rows), slots=8, enqueued_token_limit=2000).start()
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    args = ["run", str(rows_path), "--output", str(tmp_path / "out"), "--endpoint", server.url, "--batch"]
    args += ["--config", str(config), "--cache-dir", str(tmp_path / "cache")]
    try:
        assert main(args) == 2
        said = capsys.readouterr().err
        assert "refused 10 times in a row for the provider's enqueued-token limit" in said, said[-2000:]
        assert "Limit: 2,000 enqueued tokens" in said and "--batch-enqueued-tokens" in said
        assert server.requests["merge"] == 0 and len(server.batches) == 10
        # The advice taken: the same command with the limit splits the refused round's files under it
        assert main([*args, "--batch-enqueued-tokens", "2000"]) == 0
    finally:
        server.stop()
    merged = OutputFolder.open(tmp_path / "out")
    summary = merged.record.batch
    first = summary["by_round"][0]
    assert first["queue_refused"] == 10 and len(first["batches"]) >= 3 and first["enqueued_token_limit"] == 2000
    assert set(server.lines_answered.values()) == {1} and server.requests["merge"] == len(merged.pairs)
    assert server.most_batches_queued == 1
    assert main(["run", str(rows_path), "--output", str(tmp_path / "o2"), "--batch-enqueued-tokens", "9"]) == 2
    assert "--batch-enqueued-tokens sizes batch files: add --batch" in capsys.readouterr().err


def test_a_dry_run_with_the_enqueued_token_limit_says_how_many_files_the_first_round_needs(tmp_path, capsys):
    rows_path = _rows_file(tmp_path, 400)[1]
    args = ["run", str(rows_path), "--output", str(tmp_path / "o"), "--dry-run", "--batch"]
    endpoint = ["--endpoint", "http://127.0.0.1:9/v1", "--model", "gpt-4o", "--batch-enqueued-tokens", "1000"]
    assert main([*args, *endpoint]) == 0
    said = capsys.readouterr().out
    assert "with --batch: 2 rounds at the least" in said
    planned = re.search(r"first round's ([\d,]+) prompt tokens go in (\d+) file\(s\) at the least under", said)
    assert planned and int(planned[2]) == -(-int(planned[1].replace(",", "")) // 1000), said
    with pytest.raises(ConfigError, match="batch_enqueued_tokens must be >= 1"):
        MergeItConfig(batch=True, batch_enqueued_tokens=0)


def test_a_resumed_run_creates_a_new_batch_over_a_file_whose_batch_the_queue_refused(tmp_path):
    state, record, part = _one_part_round(tmp_path, ["a"], "refused for the queue: created again after the wait")
    part.batch_id, part.refused_batches = None, ["batch-1"]  # killed during the wait after the refusal
    created = []

    class Api:
        async def find(self, input_file_id: str) -> BatchInfo:  # the newest over the file: the refused one
            return BatchInfo("batch-1", "failed", input_file_id, None, None, {}, "", ("token_limit_exceeded",))

        async def create(self, input_file_id: str, route: str, window: str, metadata: dict) -> BatchInfo:
            created.append(input_file_id)
            return BatchInfo("batch-2", "validating", input_file_id, None, None, {}, "")

    rounds = BatchRounds(Api(), state, RequestCache(tmp_path / "cache"), retries=3)  # type: ignore[arg-type]
    asyncio.run(rounds._send(record, part))
    assert created == ["file-in"] and part.batch_id == "batch-2" and record.queue_refused == 0


def test_lines_failing_request_retries_times_fail_their_pair_with_the_reason(tmp_path):
    rows, rows_path = _rows_file(tmp_path, 400)

    class AlwaysFailing(ScriptedBatchServer):
        def _finish(self, batch, lines, failing, never_run=()):  # the merges' lines fail in every batch
            merges = sum(1 for line in lines if "response_format" in line["body"])
            ordered = sorted(lines, key=lambda line: "response_format" not in line["body"])
            super()._finish(batch, ordered, merges, never_run)

    server = AlwaysFailing(*scripts(rows), slots=8).start()
    _out, merged = _run_and_stop(server, tmp_path, rows_path, "--batch")
    assert set(merged.pairs["merge_status"]) == {"failed"}
    reason = merged.pairs["merge_reason"][0]
    assert "batch request failed: HTTP 500: The server had an error" in reason and "(3 batch attempts)" in reason
    assert merged.record.batch["given_up"] == len(merged.pairs)


def test_batch_is_refused_where_it_cannot_run(tmp_path):
    with pytest.raises(ConfigError, match="batch sends every request to the merge endpoint"):
        MergeItConfig(batch=True, scorer_endpoint="http://127.0.0.1:9")
    with pytest.raises(ConfigError, match="batch cannot run the prefilter"):
        MergeItConfig(batch=True, prefilter_top=0.5)
    rows_path = _rows_file(tmp_path, 50)[1]
    assert main(["run", str(rows_path), "--output", str(tmp_path / "o"), "--batch"]) == 2  # the embedded model


def test_a_server_without_a_batch_api_stops_the_run_before_stage_1(tmp_path, capsys):
    rows, rows_path = _rows_file(tmp_path, 50)
    server = ScriptedServer(*scripts(rows), slots=8, serves_info=True).start()
    try:
        args = ["run", str(rows_path), "--output", str(tmp_path / "o"), "--endpoint", server.url, "--batch"]
        assert main([*args, "--cache-dir", str(tmp_path / "cache")]) == 2
    finally:
        server.stop()
    said = capsys.readouterr()
    assert "has no usable batch API (GET /v1/batches)" in said.err and "Embedding" not in said.err


def test_a_round_is_split_into_files_at_the_limits():
    lines = [b"x" * 10 + b"\n"] * 7
    assert [len(part) for part in BatchLimits(max_requests=3).split(lines)] == [3, 3, 1]
    assert [len(part) for part in BatchLimits(max_bytes=25).split(lines)] == [2, 2, 2, 1]
    with pytest.raises(ValueError, match="above the 5 a file holds"):
        BatchLimits(max_bytes=5).split(lines)
    # 11 bytes a line: 4 estimated tokens (a token per 3 bytes, rounded up), so 3 lines fit under 12
    assert [len(part) for part in BatchLimits(max_tokens=12).split(lines)] == [3, 3, 1]
    assert not BatchLimits().sequential and BatchLimits(max_tokens=12).sequential
    with pytest.raises(ValueError, match="about 4 tokens, above batch_enqueued_tokens"):
        BatchLimits(max_tokens=3).split(lines)


def test_batch_status_without_a_batch_run_says_so(tmp_path):
    assert main(["batch-status", str(tmp_path)]) == 2


def _one_part_round(tmp_path: Path, keys: list[str], status: str) -> tuple[BatchState, RoundRecord, SubmittedFile]:
    """A round of one file, submitted as batch-1, with a merge request under each key."""
    state = BatchState.open(tmp_path / "batch", "http://127.0.0.1:9/v1")
    part = SubmittedFile("round-1-part-1.jsonl", len(keys), "file-in", "batch-1", status)
    record = RoundRecord(1, len(keys), {"merge": len(keys)}, files=[part])
    state.rounds.append(record)
    payloads = "".join(json.dumps({"key": key, "payload": {"n": key}}) + "\n" for key in keys)
    (state.folder / "round-1-part-1.payloads.jsonl").write_text(payloads)
    return state, record, part


class Killed(Exception):
    """The client killed while it downloads a batch's error file."""


def test_a_kill_while_answers_download_saves_no_count_and_expired_lines_are_not_attempts(tmp_path):
    state, record, part = _one_part_round(tmp_path, ["a", "b"], "expired")
    completion = {"choices": [{"message": {"content": "x"}}]}
    answered = {"custom_id": "a", "response": {"status_code": 200, "body": completion}}
    expired = {"custom_id": "b", "response": None, "error": {"code": "batch_expired", "message": "window ended"}}
    files = {"file-out": json.dumps(answered) + "\n", "file-err": json.dumps(expired) + "\n"}

    class Api:
        kill = True

        async def content(self, file_id: str) -> str:
            if file_id == "file-err" and self.kill:
                state.save()  # another part of the round saves while this one awaits its download
                raise Killed
            return files[file_id]

    api = Api()
    batch = BatchInfo("batch-1", "expired", "file-in", "file-out", "file-err", {}, "")
    rounds = BatchRounds(api, state, RequestCache(tmp_path / "cache"), retries=3)  # type: ignore[arg-type]
    with pytest.raises(Killed):
        asyncio.run(rounds._ingest(record, part, batch))
    saved = BatchState.read(state.folder).rounds[0]
    assert (saved.answered, saved.failed_lines, saved.files[0].ingested) == (0, 0, False)
    api.kill = False  # the resumed run ingests the part once
    resumed = BatchState.read(state.folder)
    rounds = BatchRounds(api, resumed, RequestCache(tmp_path / "cache"), retries=3)  # type: ignore[arg-type]
    asyncio.run(rounds._ingest(resumed.rounds[0], resumed.rounds[0].files[0], batch))
    done = BatchState.read(state.folder)
    assert (done.rounds[0].answered, done.rounds[0].unanswered, done.rounds[0].failed_lines) == (1, 1, 0)
    assert done.attempts == {} and done.given_up == {}  # the expired line was never run: not an attempt


def test_the_batch_over_a_file_is_found_past_the_first_page_of_the_listing():
    server = ScriptedBatchServer(*scripts([]), slots=1).start()
    try:  # 250 batches, newest first: the one over file-0 is on the listing's third page of 100
        server.batches.update({f"batch_{n}": {"id": f"batch_{n}", "input_file_id": f"file-{n}"} for n in range(250)})
        server.batches["batch_0"]["status"] = "in_progress"
        api = BatchApi(server.url, None, key_variable="MERGEIT_API_KEY", timeout_s=10, attempts=1)

        async def find(file_id: str) -> BatchInfo | None:
            try:
                return await api.find(file_id)
            finally:
                await api.aclose()

        found = asyncio.run(find("file-0"))
        assert found is not None and (found.id, found.status) == ("batch_0", "in_progress")
        assert asyncio.run(find("file-none")) is None  # every page read, none over it
    finally:
        server.stop()


def test_polls_go_on_through_an_unreachable_provider_and_stop_at_a_refused_key(tmp_path):
    state, record, part = _one_part_round(tmp_path, ["a"], "in_progress")
    completion = {"choices": [{"message": {"content": "merged"}}]}
    answer = {"custom_id": "a", "response": {"status_code": 200, "body": completion}}

    class Api:
        def __init__(self, failures: list[Exception]) -> None:
            self.failures = failures

        async def get(self, batch_id: str) -> BatchInfo:
            if self.failures:
                raise self.failures.pop(0)
            return BatchInfo(batch_id, "completed", "file-in", "file-out", None, {}, "")

        async def content(self, file_id: str) -> str:
            return json.dumps(answer) + "\n"

    outage = [EndpointError(f"http://x/v1/batches/batch-1 failed (ConnectError {n}) after retries") for n in range(3)]
    rounds = BatchRounds(Api(outage), state, RequestCache(tmp_path / "cache"), retries=3, poll_s=0)  # type: ignore[arg-type]
    asyncio.run(rounds._wait_and_ingest(record, part))
    assert part.ingested and record.answered == 1  # three failed polls in a row, then the batch's answers
    part.ingested, refused = False, [EndpointConfigError("http://x answered HTTP 401: invalid key")]
    rounds = BatchRounds(Api(refused), state, RequestCache(tmp_path / "cache"), retries=3, poll_s=0)  # type: ignore[arg-type]
    with pytest.raises(EndpointConfigError, match="401"):
        asyncio.run(rounds._wait_and_ingest(record, part))
