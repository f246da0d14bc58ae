"""Issue 26: the design card's user, in their own script: the README's snippet as written, from load to a
saved folder with its card and a publish through a test double of ``HfApi``; one session per process."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from datasets import load_dataset

import mergeit_hf as mi
from mergeit_hf.output import publish as publishing
from mergeit_hf.stage2.merge.merger import Merger
from tests.conftest import shared
from tests.helpers.pairs import pairs_dataset, real_rows, restating_scripts
from tests.helpers.scripted import ScriptedServer
from tests.test_pipeline import RecordingHfApi

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_snippet() -> str:
    section = README.read_text().split("## Use it from your `datasets` scripts", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_the_readme_snippet_runs_as_written_to_a_folder_and_one_commit(tmp_path, monkeypatch):
    records = json.loads(shared("gpteacher_roleplay.json").read_text())[:300]
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(records))
    code = readme_snippet().replace('"tatsu-lab/alpaca"', repr(str(data)))
    assert code != readme_snippet(), "the snippet no longer loads tatsu-lab/alpaca: update this test"
    rows = real_rows("gpteacher_roleplay.json", list(range(300)))
    server = ScriptedServer(*restating_scripts(rows)).start()
    api = RecordingHfApi()
    monkeypatch.setattr(publishing, "HfApi", lambda token=None: api)
    monkeypatch.setenv("MERGEIT_ENDPOINT", server.url)
    monkeypatch.setenv("MERGEIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    try:
        exec(compile(code, "README.md", "exec"), {})
    finally:
        server.stop()
    folder = tmp_path / "out" / "alpaca"
    card = (folder / "README.md").read_text()
    assert "MergeIT" in card and (folder / "mergeit" / "accounting.parquet").is_file()
    final = load_dataset(str(folder), split="train")  # the local round trip a Hub user would make
    accounting = load_dataset("parquet", data_files=str(folder / "mergeit" / "accounting.parquet"), split="train")
    assert sorted(accounting["source_index"]) == list(range(300))
    assert final.features["messages"] and len(final) > 0
    (commit,) = api.commits  # data and card in one commit
    paths = {path for _, path, _ in commit["ops"]}
    assert "README.md" in paths and any(p.startswith("data/train-") for p in paths)
    assert server.requests["merge"] > 0


def test_one_probe_per_process_across_map_batches(tmp_path):
    rows = real_rows("gpteacher_roleplay.json", list(range(48)))
    pairs = pairs_dataset(*zip(rows[::2], rows[1::2], strict=True))
    server = ScriptedServer(*restating_scripts(rows)).start()
    try:
        config = mi.MergeItConfig(compute_retention=False, min_retention=0.0, scorer_check_rows=0)
        merger = Merger(endpoint=server.url, config=config, cache_dir=str(tmp_path))
        merged = pairs.map(merger, batched=True, batch_size=4)  # six batches
        again = pairs.map(merger, load_from_cache_file=False)  # unbatched: every row a call (the cache answers)
    finally:
        server.stop()
    assert merged["merge_status"] == ["accepted"] * len(pairs) == again["merge_status"]
    assert server.info_requests == 1  # one probe for both maps and every batch: the session stayed open
    assert server.requests["merge"] == len(pairs)  # the second map re-sent nothing


@pytest.mark.parametrize("name", ["fit_topic_clusters", "add_clusters", "is_selected", "MergeStats", "push_to_hub"])
def test_old_names_still_import_with_a_warning(name):
    with pytest.warns(FutureWarning, match=f"mergeit_hf.{name} is deprecated"):
        assert getattr(mi, name) is not None
