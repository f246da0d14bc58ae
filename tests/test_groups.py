"""Issue 9: group merges (max_group_size > 2) on real rows, against the scripted chat server.

The real prompt, scheduler, scorer, retention and gate code decide; only the model's merges are scripted.
"""

from __future__ import annotations

import json
import re

import pytest
from datasets import Dataset

from mergeit_hf import MergeItConfig
from mergeit_hf.errors import TemplateError
from mergeit_hf.stage2.merge.merger import Merger
from tests.conftest import shared
from tests.helpers.pairs import pairs_dataset, real_rows, restate_all, served_cli_run
from tests.helpers.scripted import ScriptedServer, peaked

_EXAMPLE = re.compile(r"## Example ([A-E])\nInstruction: (.*)")


def _score(instruction: str, output: str) -> dict[str, float]:
    return peaked(6) if "as a second task" in instruction else peaked(3)


def _members(prompt: str, rows: list[dict]) -> list[dict]:
    """The sources a merge prompt shows, found back among ``rows`` by their instruction's first line."""
    return [next(r for r in rows if r["instruction"].startswith(line)) for _, line in _EXAMPLE.findall(prompt)]


def test_group_of_three_is_merged_gated_and_recorded(tmp_path):
    rows = real_rows("gpteacher_roleplay.json", list(range(6)))
    kept_all, dropped_c = tuple(rows[:3]), tuple(rows[3:])
    prompts = []

    def merge(prompt: str, body: dict) -> dict:
        prompts.append(prompt)
        members = _members(prompt, rows)
        return restate_all(*members) if members[0] is rows[0] else restate_all(*members[:2])

    server = ScriptedServer(merge, _score).start()
    config = MergeItConfig(max_group_size=3, alpha=0.75, min_retention=0.5, scorer_check_rows=0)
    try:
        out = pairs_dataset(kept_all, dropped_c).map(
            Merger(endpoint=server.url, config=config, cache_dir=str(tmp_path))
        )
    finally:
        server.stop()
    assert all("You are given three instruction-tuning examples" in p and "## Example C" in p for p in prompts)
    accepted, rejected = out[0], out[1]
    assert accepted["merge_status"] == "accepted", accepted["merge_reason"]
    # Eq. 9 generalised: q(m) > α·(2/k)·Σ q(s_i), with k = 3.
    assert re.search(r"> 0\.75·\(2/3\)·\(\d\.\d{3}\+\d\.\d{3}\+\d\.\d{3}\)=", accepted["merge_reason"])
    assert len(accepted["quality_more"]) == 1 and len(accepted["retention_more"]) == 1
    assert min(accepted["retention_a"], accepted["retention_b"], *accepted["retention_more"]) >= 0.5
    assert rejected["merge_status"] == "rejected" and rejected["rejection_cause"] == "retention"
    assert re.search(r"retention: (question|answer) of c \d\.\d\d < 0\.50; lost: ", rejected["merge_reason"])
    assert len(rejected["retention_more_question"]) == len(rejected["retention_more_answer"]) == 1
    assert rejected["retention_more"][0] < 0.5 <= min(rejected["retention_a"], rejected["retention_b"])


def test_a_pair_template_is_refused_for_groups(tmp_path):
    pair_only = tmp_path / "pair.jinja"
    pair_only.write_text("Merge {{ a.instruction }} and {{ b.instruction }} as JSON.")
    merger = Merger(config=MergeItConfig(max_group_size=4, merge_template=str(pair_only)))
    with pytest.raises(TemplateError, match=r"uses only a and b, but max_group_size=4 .* loop over `sources`"):
        merger.templates()
    Merger(config=MergeItConfig(merge_template=str(pair_only))).templates()  # fine for pairs


@pytest.fixture(scope="module")
def group_run(tmp_path_factory):
    """`mergeit run --config` with max_group_size 4 on 80 real roleplay rows: groups whose first source is
    long keep every source, the others drop their last one."""
    folder = tmp_path_factory.mktemp("group-run")
    rows = json.loads(shared("gpteacher_roleplay.json").read_text())[:80]

    def merge(prompt: str, body: dict) -> dict:
        members = _members(prompt, rows)
        return restate_all(*members) if len(members[0]["output"]) % 2 else restate_all(*members[:-1])

    config = "n_clusters: 4\nselection_budget: 0.9\ntau: 0.45\nmax_group_size: 4\nscorer_check_rows: 0\n"
    for output, _ in served_cli_run(folder, rows, merge, _score, config):
        yield output, rows


def test_group_run_accounts_for_every_row(group_run):
    output, rows = group_run
    pairs = Dataset.from_parquet(str(output / "mergeit" / "pairs.parquet"))
    final = Dataset.from_parquet(str(output / "data" / "train-00000-of-00001.parquet"))
    accounting = Dataset.from_parquet(str(output / "mergeit" / "accounting.parquet"))
    assert len(accounting) == len(rows) and len(set(accounting["id"])) == len(rows)
    assert max(pairs["group_size"]) > 2 and set(pairs["merge_status"]) == {"accepted", "rejected"}
    by_id = {row["id"]: row for row in final}
    fates = {row["id"]: row for row in accounting}
    for group in pairs:
        members = group["pair_id"].split("+")
        assert len(members) == group["group_size"]
        if group["merge_status"] == "accepted":
            merged = next(r for r in final if r["pair_id"] == group["pair_id"])
            assert merged["source_ids"] == members and merged["group_size"] == len(members)
            assert all(fates[m]["fate"] == "merged" and fates[m]["output_id"] == merged["id"] for m in members)
        else:  # every member kept as it was, with the group's decision
            assert all(fates[m]["fate"] == "kept: merge rejected" and by_id[m]["origin"] == "original" for m in members)
            assert by_id[members[-1]]["merge_reason"] == group["merge_reason"]
    record = json.loads((output / "mergeit" / "run.json").read_text())
    assert record["counts"]["paired rows"] == sum(pairs["group_size"])
    card = (output / "README.md").read_text()
    assert "| `group_size` |" in card and "α·(2/k)·Σ q(s_i)" in card
