"""Issue 16: retention where each part belongs, and the judge, through the real client and gate.

The labelled set's constructed merges (bench/labelled/cases.jsonl, written for this project from
bench/labelled/pairs.yaml) are served by a scripted server: each source scores 3 and each merge 6, so
the quality gate passes every merge and what decides is retention (and, where on, the judge).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from mergeit_hf import MergeItConfig
from mergeit_hf.run.cli import main
from mergeit_hf.stage2.merge.merger import Merger
from mergeit_hf.stage2.scoring.judge import read_verdict
from tests.conftest import shared
from tests.helpers.pairs import pairs_dataset, served_cli_run
from tests.helpers.scripted import ScriptedServer, peaked

CASES = Path(__file__).resolve().parent.parent / "bench" / "labelled" / "cases.jsonl"
CONFIG = MergeItConfig(alpha=0.75, scorer_check_rows=0)  # min_retention: the default


def _cases(kind: str) -> list[dict]:
    cases = [json.loads(line) for line in CASES.read_text().splitlines() if line.strip()]
    return [c for c in cases if c["class"] == kind and c["origin"] == "constructed"]


def _served(cases: list[dict], tmp_path: Path, config: MergeItConfig = CONFIG, judge=None) -> list[dict]:
    """Each case's sources as a pair, merged by the server into the case's merge."""
    by_question = {c["sources"][0]["instruction"]: c["merged"] for c in cases}
    source_outputs = {s["output"] for c in cases for s in c["sources"]}

    def score(instruction: str, output: str) -> dict[str, float]:
        return peaked(3) if output.strip() in source_outputs else peaked(6)

    def merge(prompt: str, body: dict) -> dict:
        question = prompt.split("## Example A\nInstruction: ")[1].split("\n")[0]
        return by_question[question]

    rows = [[{"id": f"{c['id']}:{side}", **s} for side, s in zip("ab", c["sources"], strict=True)] for c in cases]
    server = ScriptedServer(merge, score, judge=judge).start()
    try:
        merger = Merger(endpoint=server.url, config=config, cache_dir=str(tmp_path))
        return pairs_dataset(*map(tuple, rows)).map(merger, batched=True).to_list()
    finally:
        server.stop()


def test_two_asked_one_answered_is_rejected_naming_the_answer(tmp_path):
    merged = _served(_cases("answer dropped"), tmp_path)
    # (A kept answer identical to its source's scores as that source: those fail the quality gate as well.)
    rejected = [r for r in merged if r["merge_status"] == "rejected" and "retention" in r["rejection_cause"]]
    assert len(rejected) >= 0.9 * len(merged), [r["merge_reason"] for r in merged]
    for row in rejected:
        # e.g. "retention: answer of b 0.00 < 0.50; lost: 135, 8, 1080"
        reason = re.search(r"retention: answer of ([ab]) \d\.\d\d < 0\.50; lost: \S", row["merge_reason"])
        assert reason, row["merge_reason"]
        side = reason.group(1)
        assert row[f"retention_{side}_answer"] < 0.5 <= row[f"retention_{side}_question"]
        assert row[f"retention_{side}"] == row[f"retention_{side}_answer"]  # a source keeps its weaker part


def test_complete_merges_pass(tmp_path):
    merged = _served(_cases("complete"), tmp_path)
    accepted = [r for r in merged if r["merge_status"] == "accepted"]
    assert len(accepted) >= 0.9 * len(merged), [r["merge_reason"] for r in merged if r not in accepted]
    assert all(r["judge_p_yes"] is None and r["min_judge"] is None for r in merged)  # no judge asked


@pytest.mark.parametrize(
    ("kind", "part"),
    [("question dropped", "question"), ("one source dropped", None), ("numbers changed", "answer")],
)
def test_lossy_and_changed_merges_keep_failing(kind, part, tmp_path):
    merged = _served(_cases(kind), tmp_path)
    # A source kept alone scores as that source: the quality gate fails it too ("quality and retention").
    assert all(r["merge_status"] == "rejected" and "retention" in r["rejection_cause"] for r in merged), [
        r["merge_reason"] for r in merged if r["merge_status"] != "rejected"
    ]
    if part:
        reasons = [r["merge_reason"] for r in merged]
        assert all(f"retention: {part} of b" in reason for reason in reasons), reasons


def _swapped_names_judge(cases: list[dict]):
    swapped = {c["merged"]["output"] for c in cases if c["class"] == "names swapped"}
    return lambda prompt: 0.1 if any(output in prompt for output in swapped) else 0.9


def test_the_judge_rejects_what_retention_cannot_see(tmp_path):
    swapped, complete = _cases("names swapped"), _cases("complete")
    blind = _served(swapped, tmp_path / "retention")
    assert all(r["merge_status"] == "accepted" for r in blind)  # names all present: retention cannot see it
    judged = MergeItConfig(alpha=0.75, scorer_check_rows=0, judge=True)
    both = _served(swapped, tmp_path / "judge", judged, _swapped_names_judge(swapped))
    assert {r["rejection_cause"] for r in both} == {"judge"}
    assert all(r["merge_reason"].startswith("judge: P(yes) 0.10 < 0.50") for r in both)
    fine = _served(complete, tmp_path / "judge-complete", judged, _swapped_names_judge(swapped))
    assert all(r["merge_status"] == "accepted" and r["judge_p_yes"] == pytest.approx(0.9) for r in fine)
    assert all(r["min_judge"] == 0.5 for r in fine)


def test_a_verdict_without_yes_or_no_fails_the_pair_with_its_reason(tmp_path):
    judged = MergeItConfig(alpha=0.75, scorer_check_rows=0, judge=True)
    merged = _served(_cases("complete")[:2], tmp_path, judged, lambda prompt: {"Maybe": 0.7, "The": 0.3})
    assert {r["merge_status"] for r in merged} == {"failed"}
    assert all(r["merge_reason"].startswith("judge unavailable: neither yes nor no") for r in merged)


def test_verdicts_read_every_casing_and_normalise():
    verdict = read_verdict([("Yes", -0.5), (" yes", -3.0), ("No", -1.5), ("Maybe", -2.0)])
    p_yes, p_no = 2.718281828**-0.5, 2.718281828**-1.5
    assert verdict.p_yes == pytest.approx(p_yes / (p_yes + p_no)) and verdict.available
    assert not read_verdict([("Maybe", -0.1)]).available


def test_judge_settings_need_the_judge():
    with pytest.raises(ValueError, match="judge is off: set judge: true"):
        MergeItConfig(judge_endpoint="http://127.0.0.1:9/v1")


@pytest.fixture(scope="module")
def judged_run(tmp_path_factory):
    """`mergeit run --judge` on 60 real roleplay rows; the judge's P(yes) varies with the prompt."""
    folder = tmp_path_factory.mktemp("judged-run")
    rows = json.loads(shared("gpteacher_roleplay.json").read_text())[:60]

    def merge(prompt: str, body: dict) -> dict:
        a = prompt.split("## Example A\nInstruction: ")[1].split("\nOutput: ")
        b = prompt.split("## Example B\nInstruction: ")[1].split("\nOutput: ")
        output = a[1].split("\n\n## Example B")[0] + "\n\n" + b[1].split("\n\n## Your answer")[0]
        return {"instruction": f"{a[0]}\nThen, as a second task: {b[0]}", "input": "", "output": output}

    def score(instruction: str, output: str) -> dict[str, float]:
        return peaked(6) if "as a second task" in instruction else peaked(3)

    config = "n_clusters: 4\nselection_budget: 0.9\ntau: 0.4\nscorer_check_rows: 0\njudge: true\n"
    yield from served_cli_run(folder, rows, merge, score, config, judge=lambda p: (0.3, 0.7, 0.96)[len(p) % 3])


def test_a_judged_run_records_regates_and_sweeps_the_judge(judged_run, capsys):
    output, server = judged_run
    record = json.loads((output / "mergeit" / "run.json").read_text())
    assert record["config"]["judge"] is True and "judge" in record["endpoints"]
    causes = record["rejection_causes"]
    assert causes.get("judge", 0) > 0 and record["counts"]["merges accepted"] > 0, record
    card = (output / "README.md").read_text()
    assert "- Judge: `scripted/merge-model`" in card and "`judge_p_yes`" in card
    sent = sum(server.requests.values())
    capsys.readouterr()
    assert main(["sweep", str(output), "--min-judge", "0.9", "--alphas", "0.75", "--retentions", "0.5"]) == 0
    strict = int(re.search(r"\| 0\.75 \| (\d+) ", capsys.readouterr().out).group(1))
    assert main(["regate", str(output), "--min-judge", "0.9"]) == 0
    assert sum(server.requests.values()) == sent  # neither sent a request
    regated = json.loads((output / "mergeit" / "run.json").read_text())
    assert regated["counts"]["merges accepted"] == strict < record["counts"]["merges accepted"]
    assert regated["config"]["min_judge"] == 0.9
    from mergeit_hf.output.folder import OutputFolder

    pairs = OutputFolder.open(output).pairs.to_list()
    for row in pairs:
        if row["merge_status"] == "accepted":
            assert row["judge_p_yes"] >= 0.9 and row["min_judge"] == 0.9
    assert Counter(r["rejection_cause"] for r in pairs if r["merge_status"] == "rejected")["judge"] > 0
