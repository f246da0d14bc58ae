"""Real rows of ../shared/data as stage 2 input, and hand-written merges of them."""

from __future__ import annotations

import json

from datasets import Dataset

from mergeit_hf.pairing import PAIR_FEATURES
from tests.conftest import shared


def real_rows(name: str, indices: list[int]) -> list[dict]:
    rows = json.loads(shared(name).read_text())
    return [{"id": f"{name}:{i}", **rows[i]} for i in indices]


def pairs_dataset(*pairs: tuple[dict, dict]) -> Dataset:
    """A pairs Dataset in stage 1's schema (one cluster, similarity 0.8) from (a, b) rows."""
    columns: dict[str, list] = {name: [] for name in PAIR_FEATURES}
    for a, b in pairs:
        columns["pair_id"].append(f"{a['id']}+{b['id']}")
        columns["cluster_id"].append(0)
        columns["similarity"].append(0.8)
        for side, row in (("a", a), ("b", b)):
            for name in ("id", "instruction", "input", "output"):
                columns[f"{side}_{name}"].append(row[name])
    return Dataset.from_dict(columns, features=PAIR_FEATURES)


def restate_both(a: dict, b: dict) -> dict:
    """A merge that keeps everything of both sources."""
    return {
        "instruction": f"{a['instruction']}\nThen, as a second task: {b['instruction']}",
        "input": "\n".join(x for x in (a["input"], b["input"]) if x),
        "output": f"{a['output']}\n\n{b['output']}",
    }
