"""The dataset card: YAML metadata, counts, scores, configuration, provenance docs and citation."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import yaml
from datasets import Dataset
from huggingface_hub import DatasetCard, DatasetCardData

from mergeit_hf.embeddings.arrow import arrow_columns
from mergeit_hf.resources import resource_dir

CARD_TEMPLATE = "dataset_card.md.jinja"
DATA_GLOB = "data/train-*"
COLUMN_DOCS = {
    "id": "row id: the input row's id (given, or a content hash), or `merged-<hash of pair_id>` for a merge",
    "instruction / input / output": "the training example",
    "messages": "the same example as a user / assistant exchange (input after the instruction), for TRL's SFTTrainer",
    "origin": "`merged` (written by the LLM from two sources) or `original` (an input row kept as is)",
    "source_ids": "ids of the input rows this row derives from (every source of a merge, itself for an original)",
    "cluster_id": "k-means topic of the row (stage 1)",
    "pair_id": "`<a_id>+<b_id>[+…]` of the pair (or group) this row came from or belonged to; empty if unpaired",
    "similarity": "cosine similarity of the pair's instructions (a group: its smallest pairwise one; all-MiniLM-L6-v2)",
    "merge_status": "`accepted`, `rejected` (gate said no), `failed` (with reason) or `unpaired`",
    "merge_reason": "the gate's arithmetic, or why the merge failed",
    "quality_merged / quality_a / quality_b": "Deita expected quality scores of the merge and of its two sources",
    "retention_a / retention_b": "how much of each source survives in the merge, in [0, 1]: its weaker part "
    "(numbers, salient items and meaning; see *Retention*)",
    "retention_a_question / retention_a_answer / retention_b_question / retention_b_answer": "each source's "
    "question (instruction and input) measured in the merged instruction and input, and its answer in the merged "
    "output; the weaker part is the source's retention",
    "judge_p_yes / min_judge": "with the judge: its P(yes) that the merge answers every part of its instruction "
    "consistently with the sources, and the P(yes) a merge needed; empty without the judge",
    "group_size": "sources merged at once (2 for a pair; up to `max_group_size`)",
    "quality_more / retention_more": "a group's sources after a and b: their quality scores and retentions, in order",
    "alpha": "α of the gate q(merged) > α·(q(a) + q(b)); for a group of k, q(merged) > α·(2/k)·Σ q(s_i)",
    "min_retention": "the retention each source needed for the merge to be accepted",
    "merge_model": "model every merge request named (the server's, or --model; a local GGUF path as its file name)",
    "prompt_tokens / completion_tokens": "tokens of every reply the pair used (merges and scores), as the servers "
    "reported them; empty where a server reports none",
    "quality_model": "model id of the quality scorer: a scorer endpoint of its own, or the merge model",
    "merge_template / merge_template_sha256": "prompt template file and the sha256 of its exact text",
    "quality_template_sha256": "sha256 of the Deita quality prompt template",
    "generation_params": "JSON of the merge request's generation parameters",
    "created_at": "when the merge answer arrived (merges) or the run time (originals), UTC",
    "mergeit_version": "mergeit-hf version that wrote the row",
}


@dataclass
class RunRecord:
    """What a run did, saved as ``mergeit/run.json`` beside the data so the card can be rendered again."""

    source: str
    config: dict[str, Any]
    merge_model: str
    created_at: str
    version: str
    counts: dict[str, int]
    drop_reasons: dict[str, int] = field(default_factory=dict)
    unreadable: str = ""
    scores_incomplete: int = 0
    endpoint_hint: str | None = None
    license: str | None = None
    pretty_name: str | None = None
    source_datasets: list[str] = field(default_factory=list)
    general_size: int | None = None
    rejection_causes: dict[str, int] = field(default_factory=dict)
    scorer_check: dict[str, Any] | None = None
    regated_at: str | None = None
    quality_model: str = ""
    embedding_source: str = ""
    endpoints: dict[str, dict[str, str]] = field(default_factory=dict)  # kind, model, structured output
    tokens: dict[str, int] = field(default_factory=dict)  # prompt / completion tokens over the pairs
    engine: str = "datasets"  # what ran the stages: "datasets" (one machine) or "ray: <cluster>"
    requests: dict[str, Any] = field(default_factory=dict)  # sent (by role), retried, throttled: the servers' count
    batch: dict[str, Any] = field(default_factory=dict)  # with --batch: rounds, requests and tokens by round

    @property
    def acceptance_rate(self) -> float:
        pairs = self.counts.get("pairs", 0)
        return self.counts.get("merges accepted", 0) / pairs if pairs else 0.0

    @classmethod
    def load(cls, path: Path) -> RunRecord:
        return cls(**json.loads(path.read_text(encoding="utf-8")))


def size_category(n_rows: int) -> str:
    for limit, label in (
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
    ):
        if n_rows < limit:
            return label
    return "1M<n<10M"


def card_data(record: RunRecord, n_rows: int) -> DatasetCardData:
    return DatasetCardData(
        license=record.license or "other",
        task_categories=["text-generation"],
        size_categories=[size_category(n_rows)],
        source_datasets=record.source_datasets or None,
        pretty_name=record.pretty_name or "MergeIT-curated instructions",
        tags=["mergeit", "instruction-tuning", "synthetic", "sft"],
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": DATA_GLOB}]}],
    )


def build_card(record: RunRecord, final: Dataset, pairs: Dataset, figures: list[str] | None = None) -> DatasetCard:
    """Render ``cards/dataset_card.md.jinja`` with huggingface_hub's DatasetCard; ``figures`` are repo paths."""
    data = card_data(record, len(final))
    figures = figures or []
    return DatasetCard.from_template(
        data,
        template_path=str(resource_dir("cards") / CARD_TEMPLATE),
        pretty_name=data.pretty_name,
        source=record.source,
        version=record.version,
        merge_model=record.merge_model,
        quality_model=record.quality_model,
        endpoints=record.endpoints,
        tokens=record.tokens,
        requests=record.requests,
        embedding_source=record.embedding_source,
        scorer_endpoint_set=bool(record.config.get("scorer_endpoint")),
        created_at=record.created_at,
        counts=list(record.counts.items()),
        acceptance_rate=record.acceptance_rate,
        drop_reasons=sorted(record.drop_reasons.items()),
        unreadable=record.unreadable,
        config=record.config,
        config_yaml=yaml.safe_dump(record.config, sort_keys=True),
        score_histogram=score_histogram(pairs),
        scores_incomplete=record.scores_incomplete,
        examples=examples(pairs),
        column_docs=list(COLUMN_DOCS.items()),
        endpoint_hint=record.endpoint_hint,
        final_rows=len(final),
        general_size=record.general_size,
        rejection_causes=sorted(record.rejection_causes.items()),
        scorer_check=record.scorer_check,
        retention_figure=next((f for f in figures if f.endswith("retention.png")), None),
        sweep_figure=next((f for f in figures if f.endswith("sweep.png")), None),
        regated_at=record.regated_at,
        engine=record.engine,
        batch=record.batch,
    )


def score_histogram(pairs: Dataset) -> list[tuple[str, int, int]]:
    """Counts of scores in half-point buckets from 1.0 to 6.0."""
    if len(pairs) == 0 or "quality_merged" not in pairs.column_names:
        return []
    bucket = lambda v: f"{min(int(v * 2) / 2, 5.5):.1f}–{min(int(v * 2) / 2, 5.5) + 0.5:.1f}"  # noqa: E731
    merged = Counter(bucket(v) for v in pairs["quality_merged"] if v is not None)
    sources = Counter(bucket(v) for column in ("quality_a", "quality_b") for v in pairs[column] if v is not None)
    labels = sorted(set(merged) | set(sources))
    return [(label, merged.get(label, 0), sources.get(label, 0)) for label in labels]


def examples(pairs: Dataset, limit: int = 2) -> list[dict[str, Any]]:
    """Accepted merges first; a rejected one when none was accepted."""
    if len(pairs) == 0 or "merge_status" not in pairs.column_names:
        return []
    # Only the rows shown are read: the statuses tell which (every pair as a dict was 92,000 at a million rows).
    statuses = arrow_columns(pairs, ["merge_status"])["merge_status"]
    chosen = _first_with(pairs, statuses, "accepted", limit) or _first_with(pairs, statuses, "rejected", 1)
    shown = []
    for row in chosen:
        fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
        title = "An accepted merge" if row["merge_status"] == "accepted" else "A rejected merge (no merge was accepted)"
        numbers = ("quality_a", "quality_b", "quality_merged", "retention_a", "retention_b")
        shown.append({**row, "title": title, **{k: fmt(row.get(k)) for k in numbers}})
    return shown


def _first_with(pairs: Dataset, statuses: Any, status: str, limit: int) -> list[dict[str, Any]]:
    positions = np.flatnonzero(np.asarray(pc.equal(statuses, status).fill_null(False), dtype=bool))[:limit]
    return [pairs[int(position)] for position in positions]
