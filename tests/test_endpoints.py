"""Issue 15: every endpoint users run, each with its own rules, and faults retried as the providers' SDKs do.

Scripted servers enforce each dialect (tests/helpers/dialects.py): vLLM's served-name 404, OpenAI's key,
model list and strict ``response_format``, llama-cpp-python's 422 on ``json_schema``, TGI's grammar. The real
llama.cpp server runs the same code in test_merge_server.py.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import httpx
import pytest

from mergeit_hf import MergeItConfig
from mergeit_hf.endpoints.http.transport import (
    base_url,
    is_retryable_status,
    is_transient,
    retry_after_seconds,
    server_message,
)
from mergeit_hf.endpoints.probe import model_label
from mergeit_hf.endpoints.sending.sync import run_sync
from mergeit_hf.engines.datasets_engine import merge_stage
from mergeit_hf.errors import EndpointConfigError, EndpointError
from mergeit_hf.stage2.merge.answer import MERGE_SCHEMA
from mergeit_hf.stage2.merge.merger import Merger
from tests.helpers.dialects import FAULTS, DialectServer
from tests.helpers.pairs import FAST, cli_run, pairs_dataset, real_rows, restating_scripts

KEY = "sk-canary-0123456789abcdef"
SERVED = "Qwen/Qwen2.5-1.5B-Instruct"


@pytest.fixture(scope="module")
def rows():
    return real_rows("gpteacher_roleplay.json", list(range(40)))


@pytest.fixture(scope="module")
def pairs(rows):
    return pairs_dataset(*zip(rows[::2], rows[1::2], strict=True))


def _server(rows, **options) -> DialectServer:
    return DialectServer(*restating_scripts(rows), **options).start()


def _merge(pairs, server, tmp_path, url=None, **config):
    merger = Merger(
        endpoint=url or server.url, config=MergeItConfig(**{**FAST.to_dict(), **config}), cache_dir=str(tmp_path)
    )
    return merge_stage(pairs, merger)


def _refused(server) -> list[tuple[str, str]]:
    return [entry for entry in server.log if entry[1] != "200"]


def test_a_vllm_shaped_server_merges_every_pair_with_no_model_given(rows, pairs, tmp_path):
    server = _server(rows, dialect="vllm", served=(SERVED,))
    try:
        merged, batch = _merge(pairs, server, tmp_path)
    finally:
        server.stop()
    assert set(merged["merge_status"]) == {"accepted"} and not _refused(server)
    assert set(server.models) == {SERVED}  # every request named the served model, never a placeholder
    assert server.formats == {"json_schema": len(pairs)}  # OpenAI's form, accepted as is
    described = {"kind": "openai-compatible", "model": SERVED, "structured_output": "json_schema"}
    assert described.items() <= batch.endpoints["merge"].items()
    assert set(merged["merge_model"]) == {SERVED}


def test_an_openai_shaped_api_with_model_and_key_merges_every_pair(rows, tmp_path, monkeypatch, capfd, caplog):
    monkeypatch.setenv("MERGEIT_API_KEY", KEY)
    server = _server(rows, dialect="openai", served=("gpt-4o", "gpt-4o-mini"), api_key=KEY)
    config = "compute_retention: false\nmin_retention: 0\nscorer_check_rows: 0\nn_clusters: 2\ntau: 0.3\n"
    config += "selection_budget: 1.0\n"
    try:
        out = cli_run(tmp_path, rows, server.url + "/v1", config + "model: gpt-4o-mini\n")
    finally:
        server.stop()
    record = json.loads((out / "mergeit" / "run.json").read_text())
    assert record["counts"]["pairs"] > 0 and record["counts"]["merges failed"] == 0
    assert not _refused(server) and server.formats["json_schema"] > 0
    assert record["endpoints"]["merge"]["model"] == "gpt-4o-mini"
    assert record["tokens"]["pairs_counted"] == record["counts"]["pairs"]
    written = "".join(path.read_bytes().decode("latin-1") for path in out.rglob("*") if path.is_file())
    assert KEY not in written  # never in the data, the card, run.json or the pairs
    printed = capfd.readouterr()
    assert KEY not in printed.out + printed.err + caplog.text  # nor in what the run printed or logged


def test_several_models_and_no_model_stop_before_any_merge_naming_them(rows, pairs, tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEIT_API_KEY", KEY)
    server = _server(rows, dialect="openai", served=("gpt-4o", "gpt-4o-mini"), api_key=KEY)
    try:
        with pytest.raises(EndpointConfigError, match=r"serves several models \['gpt-4o', 'gpt-4o-mini'\].*--model"):
            _merge(pairs, server, tmp_path)
        with pytest.raises(EndpointConfigError, match=r"not 'gpt-5'.*--model"):
            _merge(pairs, server, tmp_path, model="gpt-5")
    finally:
        server.stop()
    assert server.log == []  # stopped at the probe: no chat request was sent


def test_a_refused_key_stops_at_the_probe_naming_the_variable_never_the_key(rows, pairs, tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEIT_API_KEY", "sk-wrong-" + KEY)
    server = _server(rows, dialect="openai", served=("gpt-4o",), api_key=KEY)
    try:
        with pytest.raises(EndpointConfigError) as error:
            _merge(pairs, server, tmp_path)
    finally:
        server.stop()
    message = str(error.value)
    assert "HTTP 401" in message and "MERGEIT_API_KEY" in message and "Incorrect API key" in message
    assert KEY not in message and server.log == []


def test_a_model_refused_at_request_time_stops_the_run_once_with_the_servers_words(rows, pairs, tmp_path):
    server = _server(rows, dialect="vllm", served=(SERVED,), lists_models=False)
    try:
        with pytest.raises(EndpointConfigError, match=r"HTTP 404: The model `gpt-4o` does not exist\."):
            _merge(pairs, server, tmp_path, model="gpt-4o")
    finally:
        server.stop()
    # The first refusals stop the run: the remaining pairs are not each sent and refused.
    assert 0 < len(server.log) <= 3 * len(pairs) // 2, len(server.log)


def test_without_a_model_list_or_a_model_the_run_says_what_to_give(rows, pairs, tmp_path):
    server = _server(rows, dialect="vllm", served=(SERVED,), lists_models=False)
    try:
        with pytest.raises(EndpointConfigError, match=r"names no model .*--model"):
            _merge(pairs, server, tmp_path)
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("dialect", "options", "settled", "refused_form"),
    [
        ("openai", {"json_schema_supported": False}, "json_object", "json_schema"),
        ("llamacpp", {}, "json_object+schema", "json_schema"),
    ],
)
def test_structured_output_steps_down_once_per_run(rows, pairs, tmp_path, dialect, options, settled, refused_form):
    server = _server(rows, dialect=dialect, served=("m",), slots=1, **options)
    try:
        merged, batch = _merge(pairs, server, tmp_path, concurrency=1)
    finally:
        server.stop()
    assert set(merged["merge_status"]) == {"accepted"}
    assert batch.endpoints["merge"]["structured_output"] == settled
    assert server.formats[refused_form] == 1  # refused once, then never sent again
    assert server.formats[settled] == len(pairs)


def test_tgi_gets_its_grammar_and_the_model_its_info_names(rows, pairs, tmp_path):
    server = _server(rows, dialect="tgi", model_id="meta-llama/Llama-3.1-8B-Instruct")
    try:
        merged, batch = _merge(pairs.select(range(4)), server, tmp_path)
    finally:
        server.stop()
    assert set(merged["merge_status"]) == {"accepted"} and not _refused(server)
    assert server.formats == {"json_object": 4}  # TGI's {"type": "json_object", "value": schema}
    assert batch.endpoints["merge"]["kind"] == "tgi"
    assert set(merged["merge_model"]) == {"meta-llama/Llama-3.1-8B-Instruct"}


def test_faults_at_128_slots_are_retried_and_a_rerun_resends_nothing(rows, tmp_path, caplog):
    many = real_rows("gpteacher_roleplay.json", list(range(400)))
    pairs = pairs_dataset(*zip(many[::2], many[1::2], strict=True))
    server = _server(many, dialect="vllm", served=(SERVED,), slots=128, latency_s=0.2, fault_rate=0.3, retry_after="1")
    config = {"concurrency": 128, "request_retries": 8}
    try:
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            merged, batch = _merge(pairs, server, tmp_path, **config)
    finally:
        server.stop()
    outcomes = [fate for _, fate in server.log]
    assert {fate for fate in outcomes if fate != "200"} == set(FAULTS)  # every kind of fault was served
    faults = sum(fate != "200" for fate in outcomes)
    assert 0.2 < faults / len(outcomes) < 0.4, faults / len(outcomes)
    failed = merged["merge_status"].count("failed")
    assert failed <= 0.02 * len(pairs), [r for r in merged["merge_reason"] if r.startswith("endpoint")]
    # The server's log accounts for every request the client sent: one answered request per one counted.
    assert outcomes.count("200") == batch.stats.requests_sent
    # Every dropped connection the server made is counted as unanswered, apart from the 429s and 503s.
    assert batch.endpoints["merge"]["unanswered (timeout or dropped)"] == str(outcomes.count("drop"))
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]

    healthy = _server(many, dialect="vllm", served=(SERVED,), slots=128)
    try:
        again, rerun = _merge(pairs, healthy, tmp_path, **config)
    finally:
        healthy.stop()
    assert again["merge_status"].count("failed") == 0
    # Only what had failed is sent again (a merge and its three scores at most per failed pair).
    assert rerun.stats.requests_sent == len(healthy.log) <= 4 * failed


def test_what_the_server_said_and_when_to_retry():
    def response(status, body=None, headers=None, text=None):
        request = httpx.Request("POST", "http://server/v1/chat/completions")
        if text is not None:
            return httpx.Response(status, text=text, headers=headers, request=request)
        return httpx.Response(status, json=body, headers=headers, request=request)

    vllm = {"object": "error", "message": "The model `x` does not exist.", "type": "NotFoundError", "code": 404}
    assert server_message(response(404, vllm)) == "The model `x` does not exist."
    openai = {"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error"}}
    assert server_message(response(401, openai)) == "Incorrect API key provided."
    assert server_message(response(422, {"error": "Input validation error", "error_type": "validation"})) == (
        "Input validation error"
    )
    assert server_message(response(502, text="<html>Bad gateway</html>")) == "<html>Bad gateway</html>"
    assert all(is_retryable_status(s) for s in (408, 409, 429, 500, 502, 503, 504, 524))
    assert not any(is_retryable_status(s) for s in (400, 401, 403, 404, 422))
    assert is_retryable_status(424)  # TGI: a generation that failed in a shard

    def waited(headers):
        return retry_after_seconds(httpx.HTTPStatusError("", request=None, response=response(429, {}, headers)))

    assert waited({"retry-after": "7"}) == 7.0
    assert waited({"retry-after-ms": "250"}) == 0.25
    later = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert 25 < waited({"retry-after": later}) <= 30
    assert waited({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "6m0s"}) == 120.0  # capped
    assert waited({"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "1.5s"}) == 1.5
    assert waited({"x-ratelimit-remaining-requests": "10", "x-ratelimit-reset-requests": "20s"}) is None
    assert is_transient(httpx.ReadTimeout("slow")) and is_transient(httpx.RemoteProtocolError("dropped"))


def test_urls_models_and_labels_as_users_give_them():
    assert base_url("https://api.openai.com/v1/") == "https://api.openai.com"
    assert base_url("http://127.0.0.1:8000/v1") == base_url("http://127.0.0.1:8000") == "http://127.0.0.1:8000"
    assert model_label("/home/me/models/SmolLM2-135M-Instruct.Q4_1.gguf") == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert model_label("C:\\models\\qwen.gguf") == "qwen.gguf"
    assert model_label("Qwen/Qwen2.5-1.5B-Instruct") == "Qwen/Qwen2.5-1.5B-Instruct"


def test_a_url_ending_in_v1_reaches_the_same_server(rows, pairs, tmp_path):
    server = _server(rows, dialect="sglang", served=("default",))
    try:
        merged, _ = _merge(pairs.select(range(2)), server, tmp_path, url=server.url + "/v1/")
    finally:
        server.stop()
    assert set(merged["merge_status"]) == {"accepted"} and not _refused(server)


def _hub_routes_by_model_suffix() -> bool:
    """huggingface_hub 2.5 sends a chat with an ``hf_`` token for a named provider to the router's own
    ``/v1`` as ``model:provider`` (the router resolves it and speaks OpenAI's dialect); before, to the
    provider's route under the router, with the model the Hub's mapping names, in the provider's dialect."""
    import huggingface_hub
    from packaging.version import Version

    return Version(huggingface_hub.__version__) >= Version("2.5")


_ROUTER = "https://router.huggingface.co/v1/chat/completions"
_TOGETHER = (
    ("together", _ROUTER, "meta-llama/Llama-3.3-70B-Instruct:together")
    if _hub_routes_by_model_suffix()
    else ("together", "https://router.huggingface.co/together/v1/chat/completions", "meta-llama/Llama-3.3-70B-Turbo")
)


@pytest.mark.parametrize(
    ("provider", "url", "sent_model"),
    [("auto", _ROUTER, "meta-llama/Llama-3.3-70B-Instruct"), _TOGETHER],
)
def test_hf_inference_providers_requests_at_the_transport(provider, url, sent_model, monkeypatch):
    """No provider is reachable here: the requests huggingface_hub's routing builds are read at its transport."""
    import httpx2
    from huggingface_hub.inference._providers import _common

    from mergeit_hf.endpoints.connect import EndpointSettings, open_chat_backend
    from mergeit_hf.stage2.merge.request import merge_params

    model, token = "meta-llama/Llama-3.3-70B-Instruct", "hf_canary_provider_token"
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.delenv("MERGEIT_API_KEY", raising=False)
    # huggingface_hub's own hook for a provider's model mapping (else fetched from the Hub).
    mapping = _common.InferenceProviderMapping(
        provider="together",
        hf_model_id=model,
        providerId="meta-llama/Llama-3.3-70B-Turbo",
        status="live",
        task="conversational",
    )
    monkeypatch.setitem(_common.HARDCODED_MODEL_INFERENCE_MAPPING, "together", {model: mapping})
    seen: list[httpx2.Request] = []

    def answer(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        if len(seen) == 2:
            return httpx2.Response(401, json={"error": "Invalid credentials in Authorization header"})
        message = {"role": "assistant", "content": '{"instruction": "i", "input": "", "output": "o"}'}
        body = {
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 7},
        }
        return httpx2.Response(200, json=body)

    async def run():
        settings = EndpointSettings(provider=provider, model=model, attempts=2)
        backend = await open_chat_backend(settings)
        backend._client._async_client = httpx2.AsyncClient(transport=httpx2.MockTransport(answer))
        params = merge_params(FAST, 0)
        reply = await backend.chat([{"role": "user", "content": "merge these"}], params)
        with pytest.raises(EndpointConfigError) as refused:
            await backend.chat([{"role": "user", "content": "again"}], params)
        return backend, reply, refused.value, params

    backend, reply, refused, params = run_sync(run())
    request = seen[0]
    assert str(request.url) == url and request.headers["authorization"] == f"Bearer {token}"
    body = json.loads(request.content)
    assert body["model"] == sent_model
    # OpenAI's json_schema as is to the router's /v1; huggingface_hub writes it in a provider's own dialect
    # for the provider's route (Together reads the schema flattened), never as TGI's grammar.
    flattened = {"type": "json_schema", "schema": MERGE_SCHEMA}
    assert body["response_format"] == (params["response_format"] if url == _ROUTER else flattened)
    assert body["seed"] == params["seed"]
    assert reply.usage == (12, 7) and backend.describe()["kind"] == f"hf-inference-providers:{provider}"
    assert "HTTP 401" in str(refused) and "HF_TOKEN" in str(refused) and token not in str(refused)
    assert token not in repr(backend)


def test_a_dry_run_prints_the_request_it_would_send_and_its_prompt_tokens(capsys, tmp_path):
    from mergeit_hf.run.cli import main

    args = ["run", "examples/mini_alpaca.jsonl", "--output", str(tmp_path / "out"), "--config", "examples/demo.yaml"]
    assert main([*args, "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "prompt tokens (SmolLM2-135M-Instruct.Q4_1.gguf's tokenizer):" in printed
    request = json.loads(printed[printed.index("{") :])
    assert request["model"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and request["response_format"]["type"] == "json_schema"
    assert "Instruction: " in request["messages"][0]["content"] and request["seed"] == 42
    assert main([*args, "--dry-run", "--endpoint", "http://127.0.0.1:9/v1", "--model", "gpt-4o"]) == 0
    printed = capsys.readouterr().out
    assert "(estimated at 4 characters a token)" in printed and '"model": "gpt-4o"' in printed
    assert not (tmp_path / "out").exists()  # nothing sent, nothing written


def test_offline_mode_stops_a_tgi_run_at_once_and_leaves_other_servers_alone(rows, pairs, tmp_path, monkeypatch):
    """HF_HUB_OFFLINE makes huggingface_hub refuse every InferenceClient call, even to localhost: the TGI path
    says so before any pair fails; OpenAI-compatible servers are spoken to without huggingface_hub."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    tgi = _server(rows, dialect="tgi")
    vllm = _server(rows, dialect="vllm", served=(SERVED,))
    try:
        with pytest.raises(EndpointError, match="HF_HUB_OFFLINE"):
            _merge(pairs, tgi, tmp_path)
        merged, _ = _merge(pairs.select(range(2)), vllm, tmp_path)
    finally:
        tgi.stop()
        vllm.stop()
    assert tgi.log == [] and set(merged["merge_status"]) == {"accepted"}


def test_each_endpoint_reads_its_own_key_and_model(monkeypatch):
    from mergeit_hf.endpoints.http.transport import api_key

    monkeypatch.setenv("HF_TOKEN", "hf_fallback")
    monkeypatch.setenv("MERGEIT_SCORER_API_KEY", "sk-scorer")
    monkeypatch.delenv("MERGEIT_API_KEY", raising=False)
    monkeypatch.setenv("MERGEIT_MODEL", "served-merge-model")
    config = MergeItConfig(scorer_endpoint="http://scorer:8000/v1", scorer_model="deita")
    merger = Merger(endpoint="http://merge:8000", config=config)
    merge, scorer = merger.endpoint_settings(), merger.scorer_settings()
    assert (merge.model, merge.key_variable) == ("served-merge-model", "MERGEIT_API_KEY")
    assert (scorer.model, scorer.key_variable, scorer.role) == ("deita", "MERGEIT_SCORER_API_KEY", "scorer endpoint")
    assert api_key(scorer.key_variable) == "sk-scorer" and api_key(merge.key_variable) == "hf_fallback"
    assert "sk-scorer" not in repr(merger) and "sk-scorer" not in json.dumps(config.to_dict())


def test_a_judge_endpoint_of_its_own_is_spoken_to_by_its_rules(rows, pairs, tmp_path, monkeypatch):
    """Issue 16's judge on an OpenAI-shaped server of its own: a key, two models (the judge's must be named),
    and 30% of requests failing (5xx, 429, dropped connections); merges and scores stay on their server."""
    monkeypatch.setenv("MERGEIT_JUDGE_API_KEY", KEY)
    merges = _server(rows)
    judge = DialectServer(
        *restating_scripts(rows),
        dialect="openai",
        served=("gpt-4o", "gpt-4o-mini"),
        api_key=KEY,
        fault_rate=0.3,
        judge=lambda prompt: 0.8,
    ).start()
    options = {"judge": True, "judge_endpoint": judge.url + "/v1", "request_retries": 10}
    try:
        with pytest.raises(EndpointConfigError, match=r"not 'gpt-5'"):
            _merge(pairs, merges, tmp_path / "wrong", judge_model="gpt-5", **options)
        merged, batch = _merge(pairs, merges, tmp_path / "right", judge_model="gpt-4o-mini", **options)
    finally:
        merges.stop()
        judge.stop()
    assert set(merged["merge_status"]) == {"accepted"}, set(merged["merge_reason"])
    assert merged["judge_p_yes"] == pytest.approx([0.8] * len(pairs))
    assert judge.requests["judge"] == len(pairs) and merges.requests["judge"] == 0  # each verdict asked once
    statuses = {s for _, s in judge.log}
    assert set(judge.models) == {"gpt-4o-mini"} and statuses - {"200"} <= set(FAULTS) and statuses & set(FAULTS)
    assert batch.endpoints["judge"]["model"] == "gpt-4o-mini"
