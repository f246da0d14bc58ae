"""Stage 1c: facility-location selection of representative rows inside each topic cluster.

``plan = plan_selection(ds, config)`` decides; ``ds.map(plan, batched=True)`` adds ``selected`` and
``selection_rank`` (the order in which the greedy optimiser picked the row inside its cluster, or -1);
``ds.filter(mergeit_hf.is_selected, batched=True)`` keeps the chosen rows.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
from datasets import Dataset

from mergeit_hf.config import MergeItConfig
from mergeit_hf.embeddings.arrow import column_values, take_embeddings
from mergeit_hf.stage1.dot import dot_products

#: Above this many rows a cluster is split by k-means into pieces of about ``PIECE_ROWS`` rows, and facility
#: location runs in each piece on its share of the quota: time and memory grow with n·PIECE_ROWS instead
#: of n² (a million rows in 120 topics: 8k-row clusters, 500 MB float64 similarity matrices each). Rows are
#: covered by their nearest selected rows, which sit in their own piece: bench/scale.py measures the
#: facility-location objective within 1% of the whole-cluster greedy.
DENSE_CLUSTER_LIMIT = 4_000
PIECE_ROWS = 1_000


@dataclass(frozen=True)
class SelectionPlan:
    """Which rows facility location keeps, with the budget split that explains it."""

    rank_by_id: dict[str, int]
    quota_by_cluster: dict[int, int]
    size_by_cluster: dict[int, int]

    @property
    def n_selected(self) -> int:
        return len(self.rank_by_id)

    @property
    def n_rows(self) -> int:
        return sum(self.size_by_cluster.values())

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        ids = batch["id"]
        if isinstance(ids, str):
            rank = self.rank_by_id.get(ids, -1)
            return {"selected": rank >= 0, "selection_rank": rank}
        ranks = [self.rank_by_id.get(row_id, -1) for row_id in ids]
        return {"selected": [rank >= 0 for rank in ranks], "selection_rank": ranks}


def is_selected(batch: dict[str, Any]) -> Any:
    """Predicate for ``ds.filter(is_selected, batched=True)`` (also works unbatched)."""
    return batch["selected"]


def allocate_budget(size_by_cluster: dict[int, int], budget: int | float, per_cluster: int | None) -> dict:
    """Rows to keep per cluster: fixed per cluster, or the budget split by size (largest remainder)."""
    if per_cluster is not None:
        return {cluster: min(per_cluster, size) for cluster, size in size_by_cluster.items()}
    n_rows = sum(size_by_cluster.values())
    total = min(n_rows, round(budget * n_rows) if isinstance(budget, float) else budget)
    shares = {cluster: total * size / n_rows for cluster, size in size_by_cluster.items()}
    quotas = {cluster: int(share) for cluster, share in shares.items()}
    by_remainder = sorted(shares, key=lambda cluster: (quotas[cluster] - shares[cluster], cluster))
    for cluster in by_remainder[: total - sum(quotas.values())]:
        quotas[cluster] += 1
    return quotas


def plan_selection(dataset: Dataset, config: MergeItConfig | None = None) -> SelectionPlan:
    """Run facility location inside every cluster on cosine similarity shifted to [0, 1].

    apricot needs non-negative similarities; (1 + cos) / 2 is an affine shift, so the greedy picks are
    exactly those of facility location on raw cosine similarity (clipping at 0 would change them).
    """
    config = config or MergeItConfig()
    for column in ("id", "cluster_id", "embedding"):
        if column not in dataset.column_names:
            raise KeyError(f"selection needs the {column!r} column; the dataset has {dataset.column_names}")
    ids = column_values(dataset, "id")
    clusters = np.asarray(column_values(dataset, "cluster_id"))
    order = np.argsort(clusters, kind="stable")
    bounds = np.flatnonzero(np.diff(clusters[order])) + 1
    members = {int(clusters[rows[0]]): rows for rows in np.split(order, bounds)}
    sizes = {cluster: len(rows) for cluster, rows in members.items()}
    quotas = allocate_budget(sizes, config.selection_budget, config.per_cluster_budget)
    rank_by_id: dict[str, int] = {}
    for cluster, rows in members.items():  # one cluster's embeddings in memory at a time
        vectors = take_embeddings(dataset, rows)
        for rank, local in enumerate(facility_location_ranking(vectors, quotas[cluster], config.seed)):
            rank_by_id[ids[rows[local]]] = rank
    return SelectionPlan(rank_by_id, quotas, sizes)


def facility_location_ranking(
    embeddings: np.ndarray, n_keep: int, seed: int, dense_limit: int = DENSE_CLUSTER_LIMIT
) -> list[int]:
    """Indices chosen by greedy facility location, in the order they were chosen (pieces: interleaved)."""
    if n_keep <= 0:
        return []
    if len(embeddings) == 1:
        return [0]
    if len(embeddings) > dense_limit:
        return _by_pieces(embeddings, n_keep, seed, dense_limit)
    vectors = embeddings.astype(np.float64)  # apricot's kernels take float64
    similarity = (1.0 + vectors @ vectors.T) / 2.0
    selector = _apricot_facility_location()(n_keep, metric="precomputed", optimizer="lazy", random_state=seed)
    return [int(i) for i in selector.fit(similarity).ranking]


def _by_pieces(embeddings: np.ndarray, n_keep: int, seed: int, dense_limit: int) -> list[int]:
    """Facility location inside k-means pieces of the cluster, each with its size's share of ``n_keep``;
    the pieces' rankings interleave by the fraction of each quota reached, so a rank stays an order."""
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    n_pieces = -(-len(embeddings) // min(PIECE_ROWS, dense_limit))
    # One thread: k-means' sums are reduced per thread, so its pieces changed with the thread count (a Ray
    # worker has one, the driver every core): at a million rows the engines selected 8,134 rows apart.
    with threadpool_limits(limits=1):
        labels = KMeans(n_clusters=n_pieces, random_state=seed, n_init=1).fit_predict(embeddings)
    members = [np.flatnonzero(labels == piece) for piece in range(n_pieces)]
    quotas = allocate_budget({piece: len(rows) for piece, rows in enumerate(members)}, n_keep, None)
    ranked: list[tuple[float, int]] = []
    for piece, rows in enumerate(members):
        chosen = greedy_by_gain_updates(embeddings[rows], quotas[piece])
        ranked += [(rank / quotas[piece], int(rows[local])) for rank, local in enumerate(chosen)]
    return [index for _, index in sorted(ranked)]


def greedy_by_gain_updates(embeddings: np.ndarray, n_keep: int) -> list[int]:
    """Plain greedy facility location, in numpy, for the many small pieces of a huge cluster.

    Every candidate's gain is kept up to date: a pick raises the coverage of only the rows it now serves
    best, so only those rows' terms are subtracted from the gains. The same objective as apricot's lazy
    greedy (ties aside), without its per-fit overhead, which dominates over a thousand 1,000-row pieces.
    """
    if n_keep >= len(embeddings):
        return list(range(len(embeddings)))
    similarity = (1.0 + dot_products(embeddings, embeddings)) / 2.0  # the same in both engines (see ``dot``)
    coverage = np.zeros(len(embeddings), dtype=similarity.dtype)
    gains = similarity.sum(axis=0)
    taken = np.zeros(len(embeddings), dtype=bool)
    chosen: list[int] = []
    for _ in range(n_keep):
        pick = int(np.argmax(np.where(taken, -np.inf, gains)))
        chosen.append(pick)
        taken[pick] = True
        served = np.flatnonzero(similarity[:, pick] > coverage)
        before, after = coverage[served], similarity[served, pick]
        block = similarity[served]  # symmetric: row i holds sim(i, every candidate)
        gains -= (np.maximum(block - before[:, None], 0) - np.maximum(block - after[:, None], 0)).sum(axis=0)
        coverage[served] = after
    return chosen


def facility_location_value(embeddings: np.ndarray, chosen: list[int], chunk_rows: int = 4096) -> float:
    """Σ over rows of the best (1 + cos) / 2 to a chosen row: the objective both paths maximise."""
    picked = embeddings[chosen]
    total = 0.0
    for start in range(0, len(embeddings), chunk_rows):
        total += float(((1.0 + embeddings[start : start + chunk_rows] @ picked.T) / 2.0).max(axis=1).sum())
    return total


@functools.cache
def _apricot_facility_location() -> type:
    """apricot's selector, with its numba kernels compiled once per process.

    apricot 0.6.1 JIT-compiles two kernels inside every ``fit`` (about 2 s each time, which made 120
    clusters cost four minutes). The kernel factories depend only on their flags, so memoising them
    changes no result: the rankings are identical, 300x faster per cluster.
    """
    import apricot.functions.facilityLocation as facility_module
    from apricot import FacilityLocationSelection

    for name in ("calculate_gains", "calculate_gains_sparse", "calculate_gains_sieve"):
        factory = getattr(facility_module, name)
        if not hasattr(factory, "cache_info"):
            setattr(facility_module, name, functools.cache(factory))
    return FacilityLocationSelection


def add_selection(dataset: Dataset, config: MergeItConfig | None = None, **map_kwargs: Any) -> Dataset:
    """Plan the selection and add ``selected`` / ``selection_rank`` in one call."""
    plan = plan_selection(dataset, config)
    return dataset.map(plan, batched=True, desc="Marking selection", **map_kwargs)
