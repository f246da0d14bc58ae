"""Issue 9: quality scores from a scorer endpoint of its own, as Deita's raw completions.

Merges come from the scripted chat server; scores from a real ``python -m llama_cpp.server`` (SmolLM2 as a
stand-in scorer, through ``/v1/completions``) or from a TGI-shaped scripted scorer (``/generate``).
"""

from __future__ import annotations

import json
import math

import pytest

from mergeit_hf import MergeItConfig
from mergeit_hf.endpoints.servers.local_llama import local_model_path
from mergeit_hf.run.cli import main
from mergeit_hf.stage2.merge.merger import Merger
from mergeit_hf.stage2.scoring.deita import expected_score
from tests.helpers.pairs import pairs_dataset, real_rows, restate_all
from tests.helpers.scripted import ScriptedServer, TgiScorer, peaked
from tests.helpers.servers import FaultProxy

#: Deita's quality prompt as its model card (hkust-nlp/deita-quality-scorer) and scripts write it.
DEITA_QUALITY = (
    "You are a helpful assistant. Please identify the quality score of the Response corresponding to the "
    "Question. \n #Question#:\n{instruction}\n#Response#:\n{output} \n##Quality: "
)
TOP = 50


def _deita(row: dict) -> str:
    instruction = "\n".join(x for x in (row["instruction"], row["input"]) if x)
    return DEITA_QUALITY.format(instruction=instruction, output=row["output"])


@pytest.fixture(scope="module")
def pair():
    a, b = real_rows("gpteacher_roleplay.json", [0, 1])
    return a, b, restate_all(a, b)


def _merge_server(merged: dict) -> ScriptedServer:
    def no_scores_here(instruction: str, output: str) -> dict:
        raise AssertionError("a score reached the merge server although a scorer endpoint is set")

    return ScriptedServer(lambda prompt, body: merged, no_scores_here).start()


def _merge_one_pair(pair: tuple, scorer, config: MergeItConfig, tmp_path) -> tuple[ScriptedServer, dict]:
    """Map the pair through a Merger whose merges come from a scripted chat server and whose scores come
    from ``scorer`` (stopped afterwards, as is the merge server); the merge server and the merged row."""
    a, b, merged = pair
    merges = _merge_server(merged)
    try:
        out = pairs_dataset((a, b)).map(Merger(endpoint=merges.url, config=config, cache_dir=str(tmp_path)))
    finally:
        merges.stop()
        scorer.stop()
    return merges, out[0]


@pytest.mark.server
def test_scores_are_deita_raw_completions_at_the_scorer_endpoint(pair, llama_server, tmp_path):
    a, b, merged = pair
    recorder = FaultProxy(llama_server.url).start()
    config = MergeItConfig(
        scorer_endpoint=recorder.url, top_logprobs=TOP, max_missing_score_fraction=1.0, scorer_check_rows=0
    )
    merges, row = _merge_one_pair(pair, recorder, config, tmp_path)
    assert row["merge_status"] in {"accepted", "rejected"}, row["merge_reason"]
    assert row["merge_model"] == "scripted/merge-model"
    assert row["quality_model"].endswith(local_model_path().name)  # what /v1/models names
    assert merges.requests == {"merge": 1}
    paths = [path for path, _ in recorder.posted]
    assert paths == ["/v1/completions"] * 3, paths
    prompts = {json.loads(body)["prompt"] for _, body in recorder.posted}
    assert prompts == {_deita(a), _deita(b), _deita(merged)}  # byte for byte, no chat template around it

    # The same prompt through llama.cpp in this process, as a raw completion: the same distribution.
    from llama_cpp import Llama

    llama = Llama(model_path=str(local_model_path()), n_ctx=4096, logits_all=True, verbose=False)
    for source, column in ((a, "quality_a"), (b, "quality_b"), (merged, "quality_merged")):
        answer = llama.create_completion(_deita(source), max_tokens=1, logprobs=TOP, temperature=1.0, seed=42)
        local = expected_score(answer["choices"][0]["logprobs"]["top_logprobs"][0].items())
        assert local.value is not None and row[column] == pytest.approx(local.value, abs=0.02), column


def _deita_distribution(instruction: str, output: str) -> dict[str, float]:
    return peaked(5, 0.6) if "as a second task" in instruction else peaked(3, 0.6)


def test_tgi_scorer_falls_back_to_generate_and_counts_hidden_digits(pair, tmp_path):
    a, b, merged = pair
    # One slot: requests arrive one at a time, so the route and the cap are learnt in a known order.
    scorer = TgiScorer(_deita_distribution, slots=1).start()
    config = MergeItConfig(scorer_endpoint=scorer.url, alpha=0.6, min_retention=0.0, max_missing_score_fraction=1.0)
    _, row = _merge_one_pair(pair, scorer, config, tmp_path)
    paths = [path for path, _ in scorer.posted]
    # One try of /v1/completions (TGI's has no logprobs), then /generate; its 422 names the cap, sent again at 5.
    assert paths[0] == "/v1/completions" and set(paths[1:]) == {"/generate"} and len(paths) == 1 + 3 + 1, paths
    generated = [body for path, body in scorer.posted if path == "/generate"]
    assert [body["parameters"]["top_n_tokens"] for body in generated] == [20, 5, 5, 5]
    assert {body["inputs"] for body in generated} == {_deita(a), _deita(b), _deita(merged)}
    assert row["quality_model"] == "scripted/deita-quality-scorer"
    top5 = lambda digit: sorted(peaked(digit, 0.6).items(), key=lambda kv: -kv[1])[:5]  # noqa: E731
    expected = lambda digit: expected_score((t, math.log(p)) for t, p in top5(digit)).value  # noqa: E731
    assert row["quality_a"] == pytest.approx(expected(3)) and row["quality_merged"] == pytest.approx(expected(5))
    assert row["quality_scores_incomplete"] == 3  # the cap hides one digit of every score: counted, not guessed
    assert row["merge_status"] == "accepted", row["merge_reason"]  # 4.13 > 0.6 · (3.0 + 3.0)


def test_scorer_endpoint_flag_scorer_check_and_bad_url(tmp_path, capsys):
    rows = real_rows("gpteacher_roleplay.json", list(range(6)))
    data = tmp_path / "rows.json"
    data.write_text(json.dumps([{k: r[k] for k in ("instruction", "input", "output")} for r in rows]))
    scorer = TgiScorer(lambda instruction, output: peaked(4), cap=10).start()
    try:
        code = main(
            ["check-scorer", str(data), "--scorer-endpoint", scorer.url, "--rows", "4", "--endpoint", "http://x"]
        )
    finally:
        scorer.stop()
    out = capsys.readouterr().out
    assert "scorer: scripted/deita-quality-scorer" in out and out.strip().endswith("scorer accuracy: 0.00 (n=4)")
    assert code == 0
    assert main(["check-scorer", str(data), "--scorer-endpoint", "localhost:8080"]) == 2
    assert "scorer_endpoint must be an http(s) URL, got 'localhost:8080'" in capsys.readouterr().err
