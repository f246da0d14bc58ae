"""Stage 1 on Ray Data.

What Ray spreads (over the actors and nodes of the cluster ``ray_session`` joins):
  embedding      ``map_batches`` through an actor pool, each actor holding the model (one GPU each where
                 the cluster has GPUs);
  topics         assigned in ``map_batches``, from centroids fitted on the driver on the rows ``fit_rows``
                 picks (every row up to ``minibatch_kmeans_above``, else a random sample), so the fit is the
                 datasets engine's own;
  selection      facility location per topic, ``groupby("cluster_id").map_groups``;
  pairs          the τ search per topic, ``groupby("cluster_id").map_groups``.
What stays on the driver: validation and accounting of the input (``load_rows``, memory-mapped Arrow), the
k-means fit and the budget split.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from datasets import Dataset, concatenate_datasets

from mergeit_hf.config import MergeItConfig
from mergeit_hf.embeddings.arrow import column_values, matrix
from mergeit_hf.embeddings.embedder import Embedder, given_embeddings
from mergeit_hf.inputs.loading import EMBEDDING_COLUMN
from mergeit_hf.stage1.pairs import (
    PAIR_FEATURES,
    PairMatch,
    match_cluster,
    pair_columns,
    pairing_keys,
    source_values,
)
from mergeit_hf.stage1.result import Stage1Result
from mergeit_hf.stage1.selection import SelectionPlan, allocate_budget, facility_location_ranking
from mergeit_hf.stage1.topics import TopicClusters, fit_from_sample, fit_rows

POSITION = "_position"  # a row's place in the input: every result is put back in this order
PAIR_GROUP = "_pair_group"  # the topic and system prompt a row pairs inside (``stage1.pairs.pairing_keys``)
EMBED_BATCH_ROWS = 1024


class _EmbeddingActor:
    """One embedding model per actor; Ray's numpy batches in, the same batch with ``embedding`` out."""

    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = {column: batch[column].tolist() for column in self.embedder.text_columns}
        batch[EMBEDDING_COLUMN] = np.asarray(self.embedder(texts)[EMBEDDING_COLUMN], dtype=np.float32)
        return batch


@dataclass(frozen=True)
class _AssignTopics:
    topics: TopicClusters

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {POSITION: batch[POSITION], "cluster_id": self.topics.assign(matrix(batch[EMBEDDING_COLUMN]))}


def _select_in_topic(group: dict[str, np.ndarray], quotas: dict[int, int], seed: int) -> dict[str, np.ndarray]:
    order = np.argsort(group[POSITION], kind="stable")  # the datasets engine's order inside a topic
    vectors = matrix(group[EMBEDDING_COLUMN])[order]
    ranks = np.full(len(order), -1, dtype=np.int64)
    ranking = facility_location_ranking(vectors, quotas[int(group["cluster_id"][0])], seed)
    ranks[np.asarray(ranking, dtype=np.int64)] = np.arange(len(ranking))
    return {POSITION: group[POSITION][order], "selection_rank": ranks}


@dataclass(frozen=True)
class _Selected:
    kept: np.ndarray  # by position

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        mask = self.kept[batch[POSITION]]
        return {name: values[mask] for name, values in batch.items()}


def _pair_in_topic(group: dict[str, np.ndarray], tau: float, max_group_size: int) -> dict[str, np.ndarray]:
    order = np.argsort(group[POSITION], kind="stable")
    positions = group[POSITION][order]
    matches = match_cluster(matrix(group[EMBEDDING_COLUMN])[order], tau, max_group_size)
    members = np.full((len(matches), max_group_size), -1, dtype=np.int64)
    for i, (local, _) in enumerate(matches):
        members[i, : len(local)] = positions[list(local)]
    cluster = int(group["cluster_id"][0]) if len(order) else -1
    key = int(group[PAIR_GROUP][0]) if len(order) else -1
    return {
        PAIR_GROUP: np.full(len(matches), key, dtype=np.int64),
        "cluster_id": np.full(len(matches), cluster, dtype=np.int64),
        "match_index": np.arange(len(matches), dtype=np.int64),
        "similarity": np.asarray([score for _, score in matches], dtype=np.float64),
        # One column per member (-1 past a group's size): plain Arrow columns, whatever the group size.
        **{f"member_{k}": members[:, k] for k in range(max_group_size)},
    }


def run_stage1_ray(rows: Dataset, config: MergeItConfig | None = None, embed_actors: int | None = None) -> Stage1Result:
    """Stage 1 on Ray Data over validated rows (``load_rows``); the result is the datasets engine's shape."""
    import ray.data

    config = config or MergeItConfig()
    if len(rows) == 0:
        raise ValueError("stage 1 needs at least one valid row; the input has none")
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    rows = rows.add_column(POSITION, np.arange(len(rows), dtype=np.int64))
    given = EMBEDDING_COLUMN in rows.column_names
    if given:
        rows, source = given_embeddings(rows, config)  # checked and normalised as the datasets engine does
        data = ray.data.from_huggingface(rows.select_columns([POSITION, EMBEDDING_COLUMN]))
    else:
        data, source = _embedded(rows, config, embed_actors)
    data = data.materialize()
    seconds["embed"] = _lap(started)

    started = time.perf_counter()
    topics = _fit_topics(data, len(rows), config)
    clusters = _collect(data.map_batches(_AssignTopics(topics), batch_format="numpy"), len(rows), "cluster_id")
    data = _with_column(data, "cluster_id", clusters)
    seconds["cluster"] = _lap(started)

    started = time.perf_counter()
    sizes = {int(c): int(n) for c, n in zip(*np.unique(clusters, return_counts=True), strict=True)}
    quotas = allocate_budget(sizes, config.selection_budget, config.per_cluster_budget)
    partitions = _partitions(len(sizes))
    ranked = data.groupby("cluster_id", num_partitions=partitions).map_groups(
        _select_in_topic, fn_kwargs={"quotas": quotas, "seed": config.seed}, batch_format="numpy"
    )
    ranks = _collect(ranked, len(rows), "selection_rank")
    seconds["select"] = _lap(started)

    started = time.perf_counter()
    # Pairs form inside a topic and a system prompt; multi-turn conversations pair with nothing (key -1).
    keys = pairing_keys(clusters, _conversation_column(rows, "system"), _conversation_column(rows, "multi_turn"))
    chosen = _with_column(
        data.map_batches(_Selected((ranks >= 0) & (keys >= 0)), batch_format="numpy"), PAIR_GROUP, keys
    )
    found = chosen.groupby(PAIR_GROUP, num_partitions=partitions).map_groups(
        _pair_in_topic, fn_kwargs={"tau": config.tau, "max_group_size": config.max_group_size}, batch_format="numpy"
    )
    matches = _pair_matches(found)
    seconds["pair"] = _lap(started)

    rows = _with_stage1_columns(rows, clusters, ranks, None if given else data)
    selected = rows.select(np.flatnonzero(ranks >= 0))
    pairs = _pairs(selected, matches)
    ids = column_values(rows, "id")
    plan = SelectionPlan({ids[i]: int(ranks[i]) for i in np.flatnonzero(ranks >= 0)}, quotas, sizes)
    return Stage1Result(
        rows.remove_columns(POSITION), selected.remove_columns(POSITION), pairs, topics, plan, config, seconds, source
    )


def _partitions(n_topics: int) -> int:
    """Shuffle partitions for the per-topic steps: a few per CPU of the cluster (Ray's default of 200 costs
    more in tasks than the topics' work on a small cluster), never more than the topics."""
    import ray

    return max(1, min(n_topics, 4 * int(ray.cluster_resources().get("CPU", 1))))


def _embedded(rows: Dataset, config: MergeItConfig, actors: int | None) -> tuple[Any, str]:
    import ray
    import ray.data

    gpus = int(ray.cluster_resources().get("GPU", 0))
    size = actors or max(1, gpus or int(ray.cluster_resources().get("CPU", 1)) // 2)
    embedder = Embedder(config.embedding_model, config.text_columns, config.embedding_batch_size)
    data = ray.data.from_huggingface(rows.select_columns([POSITION, *config.text_columns])).map_batches(
        _EmbeddingActor,
        fn_constructor_args=(embedder,),
        compute=ray.data.ActorPoolStrategy(size=size),
        batch_size=EMBED_BATCH_ROWS,
        batch_format="numpy",
        num_gpus=1 if gpus else 0,
    )
    device = "GPU" if gpus else "CPU"
    return data.drop_columns(list(config.text_columns)), f"{config.embedding_model} on Ray ({size} {device} actors)"


def _fit_topics(data: Any, n_rows: int, config: MergeItConfig) -> TopicClusters:
    """The datasets engine's fit, on the embeddings of ``fit_rows`` gathered to the driver."""
    wanted = fit_rows(n_rows, config)

    def keep(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        mask = np.isin(batch[POSITION], wanted)
        return {POSITION: batch[POSITION][mask], EMBEDDING_COLUMN: matrix(batch[EMBEDDING_COLUMN][mask])}

    positions, vectors = [], []
    for batch in data.map_batches(keep, batch_format="numpy").iter_batches(batch_format="numpy", batch_size=None):
        positions.append(batch[POSITION])
        vectors.append(matrix(batch[EMBEDDING_COLUMN]))
    order = np.argsort(np.concatenate(positions))
    gathered_positions, gathered = np.concatenate(positions)[order], np.concatenate(vectors)[order]
    return fit_from_sample(lambda at: gathered[np.searchsorted(gathered_positions, at)], n_rows, config)


def _collect(data: Any, n_rows: int, column: str) -> np.ndarray:
    """One column of a Ray dataset, put in input order (every position present once)."""
    values = np.full(n_rows, -1, dtype=np.int64)
    seen = 0
    for batch in data.iter_batches(batch_format="numpy", batch_size=None):
        values[batch[POSITION]] = batch[column]
        seen += len(batch[POSITION])
    if seen != n_rows:
        raise RuntimeError(f"Ray returned {seen} rows of {column!r} for {n_rows} input rows")
    return values


def _with_column(data: Any, name: str, values: np.ndarray) -> Any:
    def add(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch[name] = values[batch[POSITION]]
        return batch

    return data.map_batches(add, batch_format="numpy")


def _pair_matches(found: Any) -> list[tuple[int, int, tuple[int, ...], float]]:
    """(pairing group, match index, member positions, similarity), in the datasets engine's order."""
    matches = []
    for batch in found.iter_batches(batch_format="numpy", batch_size=None):
        members = np.stack([batch[name] for name in sorted(batch) if name.startswith("member_")], axis=1)
        for key, index, group, score in zip(
            batch[PAIR_GROUP], batch["match_index"], members, batch["similarity"], strict=True
        ):
            matches.append((int(key), int(index), tuple(int(m) for m in group if m >= 0), float(score)))
    return sorted(matches)


def _conversation_column(rows: Dataset, name: str) -> Any:
    """A conversation column of the rows (defaults for rows built without one), as the datasets engine reads it."""
    if name in rows.column_names:
        values = column_values(rows, name)
    else:
        values = [False if name == "multi_turn" else ""] * len(rows)
    return np.asarray(values, dtype=bool) if name == "multi_turn" else values


def _with_stage1_columns(rows: Dataset, clusters: np.ndarray, ranks: np.ndarray, embedded: Any) -> Dataset:
    """The datasets engine's stage 1 columns on the driver's rows: embedding (when Ray computed it),
    cluster_id, selected, selection_rank."""
    columns: dict[str, pa.Array] = {}
    if embedded is not None:
        n_rows = len(rows)
        vectors: np.ndarray | None = None
        for batch in embedded.iter_batches(batch_format="numpy", batch_size=None):
            chunk = matrix(batch[EMBEDDING_COLUMN])
            vectors = np.zeros((n_rows, chunk.shape[1]), np.float32) if vectors is None else vectors
            vectors[batch[POSITION]] = chunk
        assert vectors is not None
        columns[EMBEDDING_COLUMN] = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
    columns["cluster_id"] = pa.array(clusters.astype(np.int32))
    columns["selected"] = pa.array(ranks >= 0)
    columns["selection_rank"] = pa.array(ranks)
    return concatenate_datasets([rows, Dataset(pa.table(columns))], axis=1)


def _pairs(selected: Dataset, matches: list[tuple[int, int, tuple[int, ...], float]]) -> Dataset:
    positions = np.asarray(column_values(selected, POSITION))
    found = [
        PairMatch(tuple(int(i) for i in np.searchsorted(positions, members)), score) for _, _, members, score in matches
    ]
    return Dataset.from_dict(pair_columns(found, source_values(selected)), features=PAIR_FEATURES)


def _lap(started: float) -> float:
    return time.perf_counter() - started
