"""Stage 1 end to end: embed → topics → facility-location selection → pairs."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from datasets import Dataset, Value

from mergeit_hf.clustering import TopicClusters, assign_topics, column_values, fit_topic_clusters, iter_embeddings
from mergeit_hf.config import MergeItConfig
from mergeit_hf.embedding import Embedder, embedding_dimension, resolve_device
from mergeit_hf.errors import InputError
from mergeit_hf.loading import EMBEDDING_COLUMN
from mergeit_hf.pairing import find_pairs
from mergeit_hf.selection import SelectionPlan, is_selected, plan_selection


@dataclass
class Stage1Result:
    """Every valid row with its stage 1 columns, the selected subset and the pairs found in it."""

    rows: Dataset  # id, instruction, input, output, source_index, embedding, cluster_id, selected, rank
    selected: Dataset
    pairs: Dataset
    topics: TopicClusters
    plan: SelectionPlan
    config: MergeItConfig
    seconds: dict[str, float] = field(default_factory=dict)
    embedding_source: str = ""  # what made the embeddings: the model and device, or the input's column

    @property
    def n_rows(self) -> int:
        return len(self.rows)

    @property
    def n_selected(self) -> int:
        return len(self.selected)

    @property
    def n_pairs(self) -> int:
        return len(self.pairs)

    @property
    def n_paired_rows(self) -> int:
        return int(sum(self.pairs["group_size"])) if len(self.pairs) else 0

    @property
    def n_unpaired_selected(self) -> int:
        return self.n_selected - self.n_paired_rows

    @property
    def _unit(self) -> str:
        return "pairs" if self.config.max_group_size == 2 else f"groups of 2-{self.config.max_group_size}"

    def summary(self) -> str:
        return (
            f"{self.n_rows} rows → {self.topics.n_clusters} topics ({self.topics.method}) → "
            f"{self.n_selected} selected → {self.n_pairs} {self._unit} at τ={self.config.tau} "
            f"({self.n_paired_rows} rows paired, {self.n_unpaired_selected} selected rows unpaired)"
        )


def run_stage1(rows: Dataset, config: MergeItConfig | None = None, **map_kwargs: Any) -> Stage1Result:
    """Run stage 1 on validated rows (see ``load_rows``); ``map_kwargs`` go to every ``Dataset.map``."""
    config = config or MergeItConfig()
    if len(rows) == 0:
        raise ValueError("stage 1 needs at least one valid row; the input has none")
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    if EMBEDDING_COLUMN in rows.column_names:
        rows, source = given_embeddings(rows, config)
    else:
        embedder = Embedder(config.embedding_model, config.text_columns, config.embedding_batch_size)
        rows = rows.map(embedder, batched=True, batch_size=1024, desc="Embedding", **map_kwargs)
        source = f"{config.embedding_model} on {resolve_device(embedder.device)}"
    seconds["embed"] = _lap(started)
    started = time.perf_counter()
    topics = fit_topic_clusters(rows, config)
    large = len(rows) > config.minibatch_kmeans_above  # numpy in chunks: no per-row Python at a million rows
    if large:
        rows = rows.add_column("cluster_id", assign_topics(rows, topics), feature=Value("int32"))
    else:
        rows = rows.map(topics, batched=True, desc="Assigning topics", **map_kwargs)
    seconds["cluster"] = _lap(started)
    started = time.perf_counter()
    plan = plan_selection(rows, config)
    if large:
        ranks = np.fromiter(
            (plan.rank_by_id.get(i, -1) for i in column_values(rows, "id")), dtype=np.int64, count=len(rows)
        )
        rows = rows.add_column("selected", ranks >= 0).add_column("selection_rank", ranks)
        selected = rows.select(np.flatnonzero(ranks >= 0))
    else:
        rows = rows.map(plan, batched=True, desc="Marking selection", **map_kwargs)
        selected = rows.filter(is_selected, batched=True, desc="Keeping selection", **map_kwargs)
    seconds["select"] = _lap(started)
    started = time.perf_counter()
    pairs = find_pairs(selected, config)
    seconds["pair"] = _lap(started)
    return Stage1Result(rows, selected, pairs, topics, plan, config, seconds, source)


def given_embeddings(rows: Dataset, config: MergeItConfig) -> tuple[Dataset, str]:
    """Embeddings the input brought (computed on a GPU box or a TEI server), used as they are once checked:
    the configured model's dimension (retention embeds merges with that model), L2-normalised here so a
    dot product stays a cosine and τ means what it says."""
    expected = embedding_dimension(config.embedding_model)
    norms = []
    for chunk in iter_embeddings(rows):
        if chunk.shape[1] != expected:
            raise InputError(
                f"the input's {EMBEDDING_COLUMN!r} column has {chunk.shape[1]} dimensions, but "
                f"{config.embedding_model} makes {expected}: embed with the configured model, or drop the column"
            )
        norms.append(np.linalg.norm(chunk, axis=1))
    lengths = np.concatenate(norms)
    if (lengths == 0).any():
        raise InputError(f"the input's {EMBEDDING_COLUMN!r} column holds all-zero vectors (no direction to compare)")
    if not np.allclose(lengths, 1.0, atol=1e-4):
        rows = rows.with_format("numpy", columns=[EMBEDDING_COLUMN], output_all_columns=True).map(
            _normalised, batched=True, batch_size=8192, desc="Normalising the given embeddings"
        )
        rows = rows.with_format(None)
    return rows, f"the input's {EMBEDDING_COLUMN!r} column ({expected} dimensions, L2-normalised)"


def _normalised(batch: dict[str, Any]) -> dict[str, Any]:
    vectors = np.asarray(batch[EMBEDDING_COLUMN], dtype=np.float32)
    return {EMBEDDING_COLUMN: vectors / np.linalg.norm(vectors, axis=1, keepdims=True)}


def _lap(started: float) -> float:
    return time.perf_counter() - started
