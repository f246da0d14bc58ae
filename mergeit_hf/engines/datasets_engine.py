"""The ``datasets`` engine: both stages run over a Hugging Face ``Dataset`` on one machine.

Stage 1 chains ``Dataset.map`` / ``filter`` over the stage 1 callables (embed → topics → facility-location
selection → pairs), switching to numpy columns past ``minibatch_kmeans_above`` rows; stage 2 streams every
pair through one merge session and joins the outcome columns back onto the pairs.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from datasets import Dataset, Value

from mergeit_hf.config import MergeItConfig
from mergeit_hf.embeddings.arrow import column_values
from mergeit_hf.embeddings.embedder import Embedder, given_embeddings, resolve_device
from mergeit_hf.endpoints.sending.sync import run_sync
from mergeit_hf.inputs.loading import EMBEDDING_COLUMN
from mergeit_hf.progress import datasets_bars_off
from mergeit_hf.stage1.pairs import find_pairs
from mergeit_hf.stage1.result import Stage1Result
from mergeit_hf.stage1.selection import SelectionPlan, is_selected, plan_selection
from mergeit_hf.stage1.topics import TopicClusters, assign_topics, fit_topics
from mergeit_hf.stage2.merge.merged_pairs import merged_pairs_dataset
from mergeit_hf.stage2.merge.merger import Merger
from mergeit_hf.stage2.merge.results import MergeBatch


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
    with datasets_bars_off():  # quick steps: the stage's one bar is the embedding's
        rows, topics = _topics(rows, config, map_kwargs)
        seconds["cluster"] = _lap(started)
        started = time.perf_counter()
        rows, selected, plan = _selection(rows, config, map_kwargs)
    seconds["select"] = _lap(started)
    started = time.perf_counter()
    pairs = find_pairs(selected, config)
    seconds["pair"] = _lap(started)
    return Stage1Result(rows, selected, pairs, topics, plan, config, seconds, source)


def _topics(rows: Dataset, config: MergeItConfig, map_kwargs: dict[str, Any]) -> tuple[Dataset, TopicClusters]:
    topics = fit_topics(rows, config)
    if len(rows) > config.minibatch_kmeans_above:  # numpy in chunks: no per-row Python at a million rows
        return rows.add_column("cluster_id", assign_topics(rows, topics), feature=Value("int32")), topics
    return rows.map(topics, batched=True, desc="Assigning topics", **map_kwargs), topics


def _selection(
    rows: Dataset, config: MergeItConfig, map_kwargs: dict[str, Any]
) -> tuple[Dataset, Dataset, SelectionPlan]:
    """All rows with ``selected`` and ``selection_rank``, the selected rows, and the plan."""
    plan = plan_selection(rows, config)
    if len(rows) > config.minibatch_kmeans_above:
        ids = column_values(rows, "id")
        ranks = np.fromiter((plan.rank_by_id.get(i, -1) for i in ids), dtype=np.int64, count=len(rows))
        rows = rows.add_column("selected", ranks >= 0).add_column("selection_rank", ranks)
        return rows, rows.select(np.flatnonzero(ranks >= 0)), plan
    rows = rows.map(plan, batched=True, desc="Marking selection", **map_kwargs)
    return rows, rows.filter(is_selected, batched=True, desc="Keeping selection", **map_kwargs), plan


def _lap(started: float) -> float:
    return time.perf_counter() - started


def merge_stage(pairs: Dataset, merger: Merger, max_pairs: int | None = None) -> tuple[Dataset, MergeBatch]:
    """Run stage 2 over the pairs; pairs past ``max_pairs`` are kept unmerged with status ``skipped``.

    One session streams every pair through a window of 4 × the endpoint's concurrency (not ``map``
    batches, whose slowest pair would leave the slots idle at each batch's end). Returns the merged pairs
    and the batch's counts (``stats.requests_sent``: requests actually sent, the rest came from the request
    cache) and endpoints.
    """
    limit = len(pairs) if max_pairs is None else min(max_pairs, len(pairs))
    todo = pairs.select(range(limit))
    batch = run_sync(merger.merge_pairs(iter(todo), merger.templates(), window="auto", total=limit))
    return merged_pairs_dataset(pairs, todo, batch, merger, limit), batch
