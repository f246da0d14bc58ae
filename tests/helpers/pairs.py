"""Real rows of ../shared/data as stage 2 input, and hand-written merges of them."""

from __future__ import annotations

import json
from pathlib import Path

from datasets import Dataset

from mergeit_hf import MergeItConfig
from mergeit_hf.stage1.pairs import PAIR_FEATURES
from tests.conftest import shared

#: Stage 2 with only requests to measure: no retention model, no retention bar, no scorer check.
FAST = MergeItConfig(compute_retention=False, min_retention=0.0, scorer_check_rows=0)


def real_rows(name: str, indices: list[int]) -> list[dict]:
    rows = json.loads(shared(name).read_text())
    return [{"id": f"{name}:{i}", **rows[i]} for i in indices]


FIELDS = ("id", "instruction", "input", "output")


def pairs_dataset(*groups: tuple[dict, ...]) -> Dataset:
    """A pairs Dataset in stage 1's schema (one cluster, similarity 0.8) from (a, b, ...) rows."""
    columns: dict[str, list] = {name: [] for name in PAIR_FEATURES}
    for group in groups:
        columns["pair_id"].append("+".join(row["id"] for row in group))
        columns["cluster_id"].append(0)
        columns["similarity"].append(0.8)
        for side, row in zip(("a", "b"), group, strict=False):
            for name in FIELDS:
                columns[f"{side}_{name}"].append(row[name])
        columns["group_size"].append(len(group))
        columns["more_sources"].append([{**{name: row[name] for name in FIELDS}, "messages": []} for row in group[2:]])
        columns["system"].append("")
        for side in ("a", "b"):
            columns[f"{side}_messages"].append([])
    return Dataset.from_dict(columns, features=PAIR_FEATURES)


def restate_all(first: dict, *others: dict) -> dict:
    """A merge that keeps everything of every source."""
    rows = (first, *others)
    return {
        "instruction": first["instruction"] + "".join(f"\nThen, as a second task: {r['instruction']}" for r in others),
        "input": "\n".join(r["input"] for r in rows if r["input"]),
        "output": "\n\n".join(r["output"] for r in rows),
    }


def restating_scripts(rows: list[dict]):
    """(merge, score) scripts for a scripted server: every merge restates its sources (found by their
    instructions' first lines in the prompt) and scores 6; a source scores 3."""
    from tests.helpers.scripted import peaked

    by_line = {row["instruction"].split("\n")[0]: row for row in rows}

    def merge(prompt: str, body: dict) -> dict:
        lines = [part.split("\n")[0] for part in prompt.split("Instruction: ")[1:]]
        return restate_all(*(by_line[line] for line in lines))

    def score(instruction: str, output: str) -> dict[str, float]:
        return peaked(6) if "as a second task" in instruction else peaked(3)

    return merge, score


def cli_run(
    folder: Path, rows: list[dict], endpoint: str, config_yaml: str, output: str = "out", input_path: Path | None = None
) -> Path:
    """`mergeit run` on ``rows`` (written as JSON; or on ``input_path``) with the config given, against
    ``endpoint``; the output folder, after asserting the run exited 0. The request cache sits in ``folder``,
    so reruns are free."""
    from mergeit_hf.run.cli import main

    data, config = input_path or folder / "rows.json", folder / "config.yaml"
    if input_path is None:
        data.write_text(json.dumps(rows))
    config.write_text(config_yaml)
    args = ["run", str(data), "--output", str(folder / output), "--endpoint", endpoint, "--config", str(config)]
    assert main([*args, "--cache-dir", str(folder / "cache")]) == 0
    return folder / output


def served_cli_run(folder: Path, rows: list[dict], merge, score, config_yaml: str, **server_options):
    """For a fixture's ``yield from``: a scripted server answering ``merge`` and ``score``, one ``cli_run``
    against it, then (output folder, server) until the fixture ends; the server stops after."""
    from tests.helpers.scripted import ScriptedServer

    server = ScriptedServer(merge, score, **server_options).start()
    try:
        yield cli_run(folder, rows, server.url, config_yaml), server
    finally:
        server.stop()
