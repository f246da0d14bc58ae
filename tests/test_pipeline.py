"""Issue 4 end to end: the CLI on the Alpaca seed tasks against the real llama.cpp server."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from datasets import Dataset, load_dataset

from mergeit_hf.inputs.loading import load_rows
from mergeit_hf.output.folder import read_parquet
from mergeit_hf.output.publish import push_to_hub
from mergeit_hf.run.cli import main
from mergeit_hf.run.pipeline import save
from tests.conftest import shared

pytestmark = pytest.mark.server
SECRET = "hf_test_secret_never_written"
CONFIG = {
    "n_clusters": 10,
    "selection_budget": 1.0,
    "tau": 0.5,
    "max_new_tokens": 160,
    "top_logprobs": 1000,
    "max_missing_score_fraction": 1.0,
}


@pytest.fixture(scope="module")
def cli_run(llama_server, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    (folder / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    output = folder / "out"
    args = [
        "run",
        str(shared("alpaca_seed_tasks.jsonl")),
        "--output",
        str(output),
        "--endpoint",
        llama_server.url,
        "--config",
        str(folder / "config.yaml"),
        "--cache-dir",
        str(folder / "cache"),
        "--max-pairs",
        "4",
        "--license",
        "apache-2.0",
        "--general-size",
        "52002",
    ]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_TOKEN", SECRET)
        assert main(args) == 0
    return output, args


def _final(output: Path) -> Dataset:
    # A fresh datasets cache per load: the check is about what this run wrote, not an earlier cache entry.
    import tempfile

    return load_dataset(str(output), split="train", cache_dir=tempfile.mkdtemp(prefix="hf-cache-"))


def test_local_export_round_trips_through_load_dataset(cli_run):
    output, _ = cli_run
    files = {p.relative_to(output).as_posix() for p in output.rglob("*") if p.is_file()}
    assert {
        "README.md",
        "data/train-00000-of-00001.parquet",
        "mergeit/accounting.parquet",
        "mergeit/pairs.parquet",
        "mergeit/run.json",
    } <= files
    loaded = _final(output)
    written = Dataset.from_parquet(str(output / "data" / "train-00000-of-00001.parquet"))
    assert loaded.to_list() == written.to_list()
    assert loaded.column_names[:6] == ["id", "instruction", "input", "output", "messages", "origin"]
    # SFT-ready: every row also as the user / assistant exchange TRL's SFTTrainer reads as is.
    for row in loaded:
        user = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
        assert row["messages"] == [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
    assert any(row["input"] for row in loaded)  # the data has inputs, so the join was exercised


def test_every_input_row_is_accounted_for(cli_run):
    output, _ = cli_run
    rows, report = load_rows(shared("alpaca_seed_tasks.jsonl"))
    accounting = Dataset.from_parquet(str(output / "mergeit" / "accounting.parquet"))
    assert sorted(accounting["id"]) == sorted([*rows["id"], *(d.id for d in report.dropped)])
    final = _final(output)
    final_ids = set(final["id"])
    for row in accounting:
        if row["fate"] == "not selected" or row["fate"] == "dropped":
            assert row["output_id"] is None
        else:
            assert row["output_id"] in final_ids, row
    merged = final.filter(lambda r: r["origin"] == "merged")
    for row in merged:
        assert len(row["source_ids"]) == 2 and row["merge_status"] == "accepted"
    originals_of_merges = {s for r in merged for s in r["source_ids"]}
    assert not originals_of_merges & final_ids  # a merged row replaces its two sources


def test_provenance_columns_are_filled(cli_run):
    final = _final(cli_run[0])
    for row in final:
        assert row["origin"] in {"merged", "original"} and row["source_ids"] and row["created_at"]
        assert row["mergeit_version"] == "0.1.0"
        if row["pair_id"]:
            assert row["merge_status"] in {"accepted", "rejected", "failed", "skipped"}
            assert len(row["merge_template_sha256"]) == 64 and json.loads(row["generation_params"])["max_tokens"]
            if row["merge_status"] != "skipped":  # skipped pairs never met a model
                assert row["merge_model"].endswith(".gguf")
    assert final["id"] == sorted(final["id"], key=lambda i: (final["cluster_id"][final["id"].index(i)], i))


def test_card_renders_with_yaml_and_counts_equal_to_the_data(cli_run):
    output, _ = cli_run
    card = (output / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert header["license"] == "apache-2.0" and header["task_categories"] == ["text-generation"]
    assert header["size_categories"] == ["n<1K"] and "mergeit" in header["tags"]
    assert header["configs"][0]["data_files"][0]["path"] == "data/train-*"
    record = json.loads((output / "mergeit" / "run.json").read_text())
    final = _final(output)
    pairs = read_parquet([output / "mergeit" / "pairs.parquet"])
    counts = record["counts"]
    assert counts["final rows"] == len(final)
    assert counts["merges accepted"] == list(final["origin"]).count("merged")
    assert counts["pairs"] == len(pairs)
    assert counts["pairs"] > 4 and counts["merges skipped"] == len(pairs) - 4
    assert f"| final rows | {len(final)} |" in card
    assert f"|D| = **{len(final)}** rows" in card and f"ω = {len(final) / 52002:.4f}" in card
    for section in (
        "## Provenance columns",
        "## Configuration",
        "## Reproduce",
        "## Citation",
        "## Quality scores",
    ):
        assert section in card
    assert "2503.00034" in card and "2410.12937" in card


def test_token_never_written(cli_run):
    output, _ = cli_run
    for path in output.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_card_command_renders_the_same_card_again(cli_run):
    output, _ = cli_run
    before = (output / "README.md").read_text()
    (output / "README.md").unlink()
    assert main(["card", str(output)]) == 0
    assert (output / "README.md").read_text() == before


def test_rerun_resumes_from_the_request_cache(cli_run, capsys):
    output, args = cli_run
    assert main([*args[:3], str(output.parent / "again"), *args[4:]]) == 0
    assert re.search(r"^LLM requests sent\s+0$", capsys.readouterr().out, re.MULTILINE)
    assert _final(output.parent / "again")["output"] == _final(output)["output"]


class RecordingHfApi:
    """A test double of HfApi that records what would be committed."""

    def __init__(self) -> None:
        self.repos: list[tuple] = []
        self.commits: list[dict] = []

    def create_repo(self, repo_id, repo_type=None, private=False, exist_ok=False):
        self.repos.append((repo_id, repo_type, private, exist_ok))

    def list_repo_files(self, repo_id, repo_type=None):
        return ["README.md", "data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"]

    def create_commit(self, repo_id, repo_type, operations, commit_message):
        recorded = []
        for op in operations:
            content = Path(op.path_or_fileobj).read_bytes() if hasattr(op, "path_or_fileobj") else None
            recorded.append((type(op).__name__, op.path_in_repo, content))
        self.commits.append({"repo_id": repo_id, "repo_type": repo_type, "ops": recorded, "message": commit_message})
        return "https://huggingface.co/datasets/" + repo_id


def test_push_to_hub_commits_data_and_card_in_one_commit(cli_run, tmp_path):
    output, _ = cli_run
    final = _final(output)
    from huggingface_hub import DatasetCard

    card = DatasetCard((output / "README.md").read_text())
    api = RecordingHfApi()
    push_to_hub(
        final,
        "me/merged",
        card,
        private=True,
        api=api,
        commit_message="curated",
        extras={"accounting": Dataset.from_parquet(str(output / "mergeit" / "accounting.parquet"))},
    )
    assert api.repos == [("me/merged", "dataset", True, True)]
    (commit,) = api.commits
    ops = {(kind, path): content for kind, path, content in commit["ops"]}
    assert ops[("CommitOperationAdd", "README.md")] == str(card).encode()
    assert ("CommitOperationAdd", "data/train-00000-of-00001.parquet") in ops
    assert ("CommitOperationAdd", "mergeit/accounting.parquet") in ops
    stale = {path for kind, path in ops if kind == "CommitOperationDelete"}
    assert stale == {"data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"}
    assert commit["repo_type"] == "dataset" and commit["message"] == "curated"
    parquet = tmp_path / "pushed.parquet"
    parquet.write_bytes(ops[("CommitOperationAdd", "data/train-00000-of-00001.parquet")])
    assert Dataset.from_parquet(str(parquet)).to_list() == final.to_list()


def test_failed_publish_hides_the_token():
    class FailingApi(RecordingHfApi):
        def create_repo(self, *args, **kwargs):
            raise RuntimeError(f"401 Unauthorized for token {SECRET}")

    from huggingface_hub import DatasetCard

    from mergeit_hf import MergeItError

    with pytest.raises(MergeItError) as error:
        push_to_hub(
            Dataset.from_dict({"id": ["a"]}),
            "me/x",
            DatasetCard("---\n---\n"),
            api=FailingApi(),
            token=SECRET,
        )
    assert "me/x" in str(error.value) and SECRET not in str(error.value)


def test_dry_run_reports_calls_and_makes_none(capsys):
    assert (
        main(
            [
                "run",
                str(shared("gpteacher_roleplay.json")),
                "--output",
                "unused",
                "--dry-run",
                "--endpoint",
                "http://127.0.0.1:1",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "dry run:" in printed and "none made" in printed and "LLM calls" in printed


def test_cli_errors_are_clear_and_non_zero(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"prompt": "x", "response": "y"}]))
    assert main(["run", str(bad), "--output", str(tmp_path / "o"), "--dry-run"]) == 2
    assert "column(s) ['instruction', 'output'] not found" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing.json"), "--output", "o", "--dry-run"]) == 2
    assert main(["card", str(tmp_path)]) == 2
    result = subprocess.run(
        [sys.executable, "-m", "mergeit_hf", "run", str(bad), "--output", "o", "--column", "instruction"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "FIELD=NAME" in result.stderr


def test_save_writes_the_same_layout_as_the_cli(cli_run, tmp_path):
    # Library users get the same folder from pipeline.save as CLI users do.
    output, _ = cli_run
    assert (output / "mergeit" / "run.json").is_file() and callable(save)
