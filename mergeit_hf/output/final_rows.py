"""The rows of the final dataset, with provenance on every one: a merge, or an original kept as it came.

``messages`` is what an SFT trainer reads: a conversation leaves with the turns it came with (roles
normalised, contents as they were), a merge as [system?, user, assistant] under its sources' system prompt,
an Alpaca row as one user / assistant exchange. Row by row, for a batch at a time (``assemble``) or for a
folder's pairs re-gated (``regate``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from datasets import Dataset, Features, Sequence, Value

from mergeit_hf.stage1.pairs import group_conversations, group_sources

PROVENANCE_FEATURES = Features(
    {
        "id": Value("string"),
        "instruction": Value("string"),
        "input": Value("string"),
        "output": Value("string"),
        "messages": [{"role": Value("string"), "content": Value("string")}],
        "origin": Value("string"),
        "system": Value("string"),  # the system prompt of a conversation (also messages[0]); "" for none
        "source_ids": Sequence(Value("string")),
        "cluster_id": Value("int32"),
        "pair_id": Value("string"),
        "similarity": Value("float32"),
        "merge_status": Value("string"),
        "merge_reason": Value("string"),
        "quality_merged": Value("float64"),
        "quality_a": Value("float64"),
        "quality_b": Value("float64"),
        "retention_a": Value("float64"),
        "retention_b": Value("float64"),
        "retention_a_question": Value("float64"),
        "retention_a_answer": Value("float64"),
        "retention_b_question": Value("float64"),
        "retention_b_answer": Value("float64"),
        "judge_p_yes": Value("float64"),
        "group_size": Value("int32"),
        "quality_more": [Value("float64")],
        "retention_more": [Value("float64")],
        "alpha": Value("float64"),
        "min_retention": Value("float64"),
        "min_judge": Value("float64"),
        "merge_model": Value("string"),
        "quality_model": Value("string"),
        "merge_template": Value("string"),
        "merge_template_sha256": Value("string"),
        "quality_template_sha256": Value("string"),
        "generation_params": Value("string"),
        "created_at": Value("string"),
        "mergeit_version": Value("string"),
    }
)
_MERGE_COLUMNS = (
    "merge_model",
    "quality_model",
    "merge_template",
    "merge_template_sha256",
    "quality_template_sha256",
    "generation_params",
    "mergeit_version",
)


PART_COLUMNS = ("retention_a_question", "retention_a_answer", "retention_b_question", "retention_b_answer")
_PAIR_DECISION_COLUMNS = (
    "pair_id",
    "similarity",
    "merge_status",
    "merge_reason",
    "quality_merged",
    "quality_a",
    "quality_b",
    "retention_a",
    "retention_b",
    *PART_COLUMNS,
    "judge_p_yes",
    "group_size",
    "quality_more",
    "retention_more",
    "alpha",
    "min_retention",
    "min_judge",
    *_MERGE_COLUMNS,
)


Fate = tuple[str, str, str | None]  # (fate, detail, output row id)


def merged_row_id(pair_id: str) -> str:
    return "merged-" + hashlib.sha256(pair_id.encode("utf-8")).hexdigest()[:16]


def final_dataset(rows: list[dict]) -> Dataset:
    rows.sort(key=lambda row: (row["cluster_id"], row["id"]))
    return Dataset.from_dict(final_columns(rows), features=PROVENANCE_FEATURES)


def final_columns(rows: list[dict]) -> dict[str, list]:
    """The rows as columns, each with its ``system`` ("" for none) and ``messages`` filled in."""
    for row in rows:
        row["system"] = row.get("system") or ""
        if not row.get("messages"):  # a merge, or an Alpaca row: one exchange
            row["messages"] = to_messages(row["instruction"], row["input"], row["output"], row["system"])
    return {name: [row[name] for row in rows] for name in PROVENANCE_FEATURES}


def to_messages(instruction: str, input: str | None, output: str, system: str = "") -> list[dict[str, str]]:
    """The row as one user / assistant exchange (TRL's conversational format), after its system prompt if it
    has one: the input, when there is one, follows the instruction after a blank line, as in Alpaca's prompt."""
    user = f"{instruction}\n\n{input}" if input else instruction
    head = [{"role": "system", "content": system}] if system else []
    return [*head, {"role": "user", "content": user}, {"role": "assistant", "content": output}]


def pair_rows(merged_pairs: Iterable[dict], created_at: str, version: str) -> tuple[list[dict], dict[str, Fate]]:
    """Final rows from the pairs (a merge, or every original with the group's decision) and each source's fate."""
    rows: list[dict] = []
    fate: dict[str, Fate] = {}
    for pair in merged_pairs:
        sources = group_sources(pair)
        for source, turns in zip(sources, group_conversations(pair), strict=True):
            source.update(messages=turns, system=pair.get("system") or "")
        if pair["merge_status"] == "accepted":
            rows.append(merged_row(pair, [source["id"] for source in sources]))
            for source in sources:
                fate[source["id"]] = ("merged", pair["merge_reason"], rows[-1]["id"])
            continue
        kind = f"kept: merge {pair['merge_status']}"  # rejected, failed or skipped
        for source in sources:
            row = original_row({**source, "cluster_id": pair["cluster_id"]}, created_at, version)
            # The group's whole decision travels with every original: scores, gate, model, template.
            row.update({name: pair.get(name) for name in _PAIR_DECISION_COLUMNS})
            rows.append(row)
            fate[source["id"]] = (kind, pair["merge_reason"], row["id"])
    return rows, fate


def merged_row(pair: dict, source_ids: list[str]) -> dict:
    row = {name: None for name in PROVENANCE_FEATURES}
    row.update(
        id=merged_row_id(pair["pair_id"]),
        instruction=pair["merged_instruction"],
        input=pair["merged_input"],
        output=pair["merged_output"],
        system=pair.get("system") or "",
        origin="merged",
        source_ids=source_ids,
        cluster_id=pair["cluster_id"],
        pair_id=pair["pair_id"],
        similarity=pair["similarity"],
        merge_status="accepted",
        merge_reason=pair["merge_reason"],
        quality_merged=pair["quality_merged"],
        quality_a=pair["quality_a"],
        quality_b=pair["quality_b"],
        retention_a=pair["retention_a"],
        retention_b=pair["retention_b"],
        **{name: pair.get(name) for name in (*PART_COLUMNS, "judge_p_yes", "min_judge")},
        group_size=pair.get("group_size") or 2,
        quality_more=pair.get("quality_more") or [],
        retention_more=pair.get("retention_more") or [],
        alpha=pair["alpha"],
        min_retention=pair["min_retention"],
        created_at=pair["merged_at"],
        **{name: pair.get(name) for name in _MERGE_COLUMNS},
    )
    return row


def original_row(source: dict, created_at: str, version: str) -> dict:
    row = {name: None for name in PROVENANCE_FEATURES}
    row.update(
        id=source["id"],
        instruction=source["instruction"],
        input=source["input"],
        output=source["output"],
        system=source.get("system") or "",
        messages=source.get("messages") or None,
        origin="original",
        source_ids=[source["id"]],
        cluster_id=source["cluster_id"],
        merge_status="unpaired",
        created_at=created_at,
        mergeit_version=version,
    )
    return row
