"""Stage 2 against a real llama.cpp server (python -m llama_cpp.server with the SmolLM2 GGUF)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
from aiohttp import web
from datasets.fingerprint import Hasher

import mergeit_hf
import mergeit_hf.endpoints.probe
from mergeit_hf import EndpointError, MergeItConfig, QualityScoringError
from mergeit_hf.endpoints.connect import open_chat_backend
from mergeit_hf.stage2.merge.merger import Merger
from tests.helpers.servers import LoopbackServer, free_port

pytestmark = pytest.mark.server
STATUSES = {"accepted", "rejected", "failed"}
FAST = MergeItConfig(max_new_tokens=160, top_logprobs=1000, max_missing_score_fraction=1.0, request_timeout_s=60)


@pytest.fixture(scope="module")
def pairs(roleplay_stage1):
    return roleplay_stage1.pairs.select(range(3))


def _check_outcomes(merged, n_pairs, must_merge=True):
    assert len(merged) == n_pairs
    if must_merge:
        assert set(merged["merge_status"]) & {"accepted", "rejected"}, list(merged["merge_reason"])
    for row in merged:
        assert row["merge_status"] in STATUSES and row["merge_reason"]
        if row["merge_status"] != "failed":
            assert all(isinstance(row[q], float) for q in ("quality_merged", "quality_a", "quality_b"))
            assert row["merged_instruction"] and row["merged_output"]


def test_batched_and_unbatched_map_agree(pairs, llama_server, tmp_path):
    merger = Merger(endpoint=llama_server.url, config=FAST, cache_dir=str(tmp_path))
    batched = pairs.map(merger, batched=True)
    _check_outcomes(batched, len(pairs))
    model_id = batched[0]["merge_model"]
    assert model_id.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert batched[0]["merge_template"] == "merge.jinja" and len(batched[0]["merge_template_sha256"]) == 64
    assert json.loads(batched[0]["generation_params"])["response_format"]["json_schema"]["schema"]["required"] == [
        "instruction",
        "input",
        "output",
    ]
    unbatched = pairs.map(merger)  # the design card's plain ds.map(merge_batch): same answers, from the cache
    assert unbatched["merge_status"] == batched["merge_status"]
    assert unbatched["merged_output"] == batched["merged_output"]


def test_module_merge_batch_reads_the_endpoint_from_the_environment(pairs, llama_server, monkeypatch, tmp_path):
    monkeypatch.setenv("MERGEIT_CACHE", str(tmp_path))
    monkeypatch.setenv("MERGEIT_ENDPOINT", llama_server.url)
    hash_with_server = Hasher.hash(mergeit_hf.merge_batch)
    merged = pairs.select(range(1)).map(mergeit_hf.merge_batch)
    assert merged[0]["merge_status"] in STATUSES
    monkeypatch.setenv("MERGEIT_ENDPOINT", "http://127.0.0.1:1")
    assert Hasher.hash(mergeit_hf.merge_batch) != hash_with_server  # never reuse another endpoint's results


def test_merger_hashes_identically_in_a_new_process():
    merger = Merger(endpoint="http://127.0.0.1:8080", config=FAST)
    code = (
        "from datasets.fingerprint import Hasher; from mergeit_hf import MergeItConfig; "
        "from mergeit_hf.stage2.merge.merger import Merger; "
        f"print(Hasher.hash(Merger(endpoint='http://127.0.0.1:8080', config=MergeItConfig(**{FAST.to_dict()!r}))))"
    )
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert printed.strip() == Hasher.hash(merger)


def test_faults_are_retried_and_every_pair_ends_with_a_status(pairs, fault_proxy, tmp_path):
    fault_proxy.faults = ["429", "503", "drop", "424", "slow", "429"]
    fault_proxy.slow_s = 20.0  # longer than the timeout below, which is longer than any real answer here
    config = MergeItConfig(**{**FAST.to_dict(), "request_timeout_s": 12.0, "concurrency": 1, "request_retries": 8})
    started = time.monotonic()
    merged = pairs.map(Merger(endpoint=fault_proxy.url, config=config, cache_dir=str(tmp_path)), batched=True)
    _check_outcomes(merged, len(pairs))
    assert not fault_proxy.faults, "every planned fault was served"
    assert {"429", "503", "drop", "424", "slow"} <= set(fault_proxy.seen)
    assert not [r for r in merged["merge_reason"] if r.startswith("endpoint error")]  # all were retried
    assert time.monotonic() - started >= 2.0  # the two 429 answers asked for Retry-After: 1


def test_an_endpoint_that_keeps_failing_fails_pairs_with_a_reason(pairs, fault_proxy, tmp_path):
    fault_proxy.faults = ["503"] * 200
    config = MergeItConfig(**{**FAST.to_dict(), "request_retries": 2})
    merged = pairs.map(Merger(endpoint=fault_proxy.url, config=config, cache_dir=str(tmp_path)), batched=True)
    assert merged["merge_status"] == ["failed"] * len(pairs)
    assert all("HTTP 503" in reason and fault_proxy.url in reason for reason in merged["merge_reason"])


def test_concurrency_and_model_id_come_from_info(fault_proxy):
    fault_proxy.info = {"model_id": "hkust-nlp/deita-quality-scorer", "max_concurrent_requests": 3}
    backend = mergeit_hf.stage2.merge.merger.run_sync(
        open_chat_backend(Merger(endpoint=fault_proxy.url).endpoint_settings())
    )
    assert (backend.model_id, backend.default_concurrency) == ("hkust-nlp/deita-quality-scorer", 3)


def test_unreachable_endpoint_fails_fast_naming_the_url_not_the_token(pairs, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_123")  # read at call time, never stored
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(EndpointError) as error:
        pairs.map(Merger(endpoint=url, cache_dir=str(tmp_path)), batched=True)
    assert time.monotonic() - started < 15
    assert url in str(error.value) and "hf_secret_token_123" not in str(error.value)


@dataclass
class _BusyServer(LoopbackServer):
    """Answers ``/v1/models`` only after ``busy_s``, as llama.cpp's one-slot server does mid-generation."""

    busy_s: float = 1.5

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/models", self._models)

    async def _models(self, request: web.Request) -> web.Response:
        await asyncio.sleep(self.busy_s)
        return web.json_response({"data": [{"id": "busy/model"}]})


def test_probe_waits_for_a_busy_server_as_long_as_a_request_may(monkeypatch):
    monkeypatch.setattr(mergeit_hf.endpoints.probe, "_PROBE_CONNECT_TIMEOUT_S", 0.3)  # shorter than the busy wait
    server = _BusyServer().start()
    try:
        probe = mergeit_hf.endpoints.probe.probe_server
        served = mergeit_hf.stage2.merge.merger.run_sync(probe(server.url, None, "LLM endpoint", read_timeout_s=30))
        assert served.model == "busy/model"
        with pytest.raises(EndpointError, match=r"did not answer the LLM endpoint .*/v1/models.*request_timeout_s"):
            mergeit_hf.stage2.merge.merger.run_sync(probe(server.url, None, "LLM endpoint", read_timeout_s=0.3))
    finally:
        server.stop()


def test_missing_digit_scores_stop_the_run(roleplay_stage1, llama_server, tmp_path):
    config = MergeItConfig(max_new_tokens=64, top_logprobs=1, max_missing_score_fraction=0.0)
    with pytest.raises(QualityScoringError, match="lacked some of the digits"):
        roleplay_stage1.pairs.select(range(6)).map(
            Merger(endpoint=llama_server.url, config=config, cache_dir=str(tmp_path)), batched=True
        )


def _cached(cache_dir) -> int:
    with sqlite3.connect(cache_dir / "requests.sqlite3") as db:
        return db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]


def test_sigkill_half_way_then_resume_resends_nothing_completed(roleplay_stage1, fault_proxy, tmp_path):
    pairs_path = tmp_path / "pairs.parquet"
    roleplay_stage1.pairs.select(range(4)).to_parquet(str(pairs_path))
    script = [sys.executable, "-m", "tests.helpers.merge_script", str(pairs_path), fault_proxy.url]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    cache, out = tmp_path / "cache", tmp_path / "resumed.json"
    run = subprocess.Popen([*script, str(cache), str(out)], env=env)
    deadline = time.monotonic() + 300
    while fault_proxy.forwarded < 5 and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert not out.exists(), "killed before it finished"
    completed_before_kill = _cached(cache)
    assert completed_before_kill >= 4
    while fault_proxy.active:  # the server still answers what the killed run had in flight: not run 2's
        time.sleep(0.05)

    fault_proxy.forwarded, fault_proxy.bodies = 0, []
    subprocess.run([*script, str(cache), str(out)], env=env, check=True, timeout=600)
    assert fault_proxy.forwarded == _cached(cache) - completed_before_kill  # nothing completed was re-sent

    clean = tmp_path / "clean.json"
    subprocess.run([*script, str(tmp_path / "clean-cache"), str(clean)], env=env, check=True, timeout=600)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "merged_at"} for r in rows]  # noqa: E731
    assert strip(json.loads(out.read_text())) == strip(json.loads(clean.read_text()))


def test_unparseable_output_is_retried_then_failed_with_its_reason(pairs, llama_server, tmp_path):
    config = MergeItConfig(**{**FAST.to_dict(), "max_new_tokens": 8, "parse_retries": 2})
    merged = pairs.select(range(1)).map(Merger(endpoint=llama_server.url, config=config, cache_dir=str(tmp_path)))
    assert merged[0]["merge_status"] == "failed" and merged[0]["merge_attempts"] == 3
    assert "no valid JSON after 3 attempts" in merged[0]["merge_reason"] and "cut off" in merged[0]["merge_reason"]
    assert isinstance(merged[0]["quality_a"], float)  # the sources' scores are kept for the record


def test_embedded_default_runs_in_process_without_a_server(pairs, monkeypatch, tmp_path):
    monkeypatch.delenv("MERGEIT_ENDPOINT", raising=False)
    merged = pairs.select(range(1)).map(Merger(config=FAST, cache_dir=str(tmp_path)), batched=True)
    assert merged[0]["merge_model"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert merged[0]["merge_status"] in {"accepted", "rejected"}
    assert merged[0]["quality_scores_incomplete"] <= 3


def test_a_real_llama_server_settles_its_structured_output_and_names_its_model_by_file(pairs, llama_server, tmp_path):
    """llama-cpp-python's server refuses OpenAI's json_schema (422) and reads json_object + schema; it reports
    its GGUF path as the model, which the card shows as the file name."""
    from mergeit_hf.engines.datasets_engine import merge_stage

    llama_server.wait_idle()
    merger = Merger(endpoint=llama_server.url + "/v1", config=FAST, cache_dir=str(tmp_path))
    merged, batch = merge_stage(pairs.select(range(1)), merger)
    described = {
        "kind": "openai-compatible",
        "model": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "structured_output": "json_object+schema",
    }
    assert described.items() <= batch.endpoints["merge"].items()
    assert merged["merge_model"] == ["SmolLM2-135M-Instruct.Q4_1.gguf"] and "/" not in merged["merge_model"][0]
    assert merged["prompt_tokens"][0] > 100 and merged["completion_tokens"][0] > 0  # the server's own usage


def test_the_judge_reads_a_real_models_first_token(pairs, llama_server, tmp_path):
    """Issue 16: the judge's verdict read from a real server's logprobs (SmolLM2 behind llama.cpp's server):
    both words among its top logprobs, P(yes) a probability, the column filled and the gate reading it."""
    from mergeit_hf.engines.datasets_engine import merge_stage

    llama_server.wait_idle()
    config = MergeItConfig(**{**FAST.to_dict(), "judge": True, "min_judge": 0.99})
    merger = Merger(endpoint=llama_server.url + "/v1", config=config, cache_dir=str(tmp_path))
    merged, batch = merge_stage(pairs.select(range(2)), merger)
    assert batch.endpoints["judge"]["model"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    scored = [row for row in merged if row["merge_status"] != "failed"]
    assert scored, list(merged["merge_reason"])
    for row in scored:
        assert 0.0 < row["judge_p_yes"] < 1.0 and row["min_judge"] == 0.99
        # a 135M model is never that sure: the gate at 0.99 rejects, naming the judge
        assert row["merge_status"] == "rejected" and "judge" in row["rejection_cause"], row["merge_reason"]
