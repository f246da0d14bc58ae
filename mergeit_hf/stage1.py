"""Stage 1 end to end: embed → topics → facility-location selection → pairs."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from datasets import Dataset, Sequence, Value

from mergeit_hf.clustering import TopicClusters, fit_topic_clusters
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
    rows = rows.map(topics, batched=True, desc="Assigning topics", **map_kwargs)
    seconds["cluster"] = _lap(started)
    started = time.perf_counter()
    plan = plan_selection(rows, config)
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
    vectors = np.asarray(rows[EMBEDDING_COLUMN], dtype=np.float32)
    expected = embedding_dimension(config.embedding_model)
    if vectors.shape[1] != expected:
        raise InputError(
            f"the input's {EMBEDDING_COLUMN!r} column has {vectors.shape[1]} dimensions, but {config.embedding_model} "
            f"makes {expected}: embed with the configured model, or drop the column to embed here"
        )
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if (norms == 0).any():
        raise InputError(f"the input's {EMBEDDING_COLUMN!r} column holds all-zero vectors (no direction to compare)")
    normalised = list(vectors / norms)
    rows = rows.remove_columns(EMBEDDING_COLUMN).add_column(
        EMBEDDING_COLUMN, normalised, feature=Sequence(Value("float32"))
    )
    return rows, f"the input's {EMBEDDING_COLUMN!r} column ({expected} dimensions, L2-normalised)"


def _lap(started: float) -> float:
    return time.perf_counter() - started
