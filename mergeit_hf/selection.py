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

from mergeit_hf.clustering import iter_embeddings
from mergeit_hf.config import MergeItConfig

#: Above this many rows a cluster uses a sparse k-nearest-neighbour similarity graph, so memory grows
#: with n·k instead of n². (apricot's own ``n_neighbors`` still builds the dense matrix first.)
DENSE_CLUSTER_LIMIT = 15_000
SPARSE_NEIGHBOURS = 100
_KNN_CHUNK_ROWS = 2048


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

    @property
    def kept_fraction(self) -> float:
        return self.n_selected / self.n_rows if self.n_rows else 0.0

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
    ids = dataset["id"]
    clusters = np.asarray(dataset["cluster_id"])
    embeddings = np.concatenate(list(iter_embeddings(dataset)))
    members = {int(c): np.flatnonzero(clusters == c) for c in np.unique(clusters)}
    sizes = {cluster: len(rows) for cluster, rows in members.items()}
    quotas = allocate_budget(sizes, config.selection_budget, config.per_cluster_budget)
    rank_by_id: dict[str, int] = {}
    for cluster, rows in members.items():
        for rank, local in enumerate(_facility_location(embeddings[rows], quotas[cluster], config.seed)):
            rank_by_id[ids[rows[local]]] = rank
    return SelectionPlan(rank_by_id, quotas, sizes)


def _facility_location(
    embeddings: np.ndarray, n_keep: int, seed: int, dense_limit: int = DENSE_CLUSTER_LIMIT
) -> list[int]:
    """Indices chosen by greedy facility location, in the order they were chosen."""
    if n_keep <= 0:
        return []
    if len(embeddings) == 1:
        return [0]
    embeddings = embeddings.astype(np.float64)
    if len(embeddings) > dense_limit:
        similarity = knn_similarity_graph(embeddings, min(SPARSE_NEIGHBOURS, len(embeddings)))
    else:
        similarity = (1.0 + embeddings @ embeddings.T) / 2.0
    selector = _apricot_facility_location()(n_keep, metric="precomputed", optimizer="lazy", random_state=seed)
    return [int(i) for i in selector.fit(similarity).ranking]


def knn_similarity_graph(embeddings: np.ndarray, n_neighbours: int) -> Any:
    """Sparse (1 + cos) / 2 to each row's ``n_neighbours`` most similar rows, built chunk by chunk."""
    from scipy.sparse import csr_matrix

    n_rows = len(embeddings)
    columns = np.empty((n_rows, n_neighbours), dtype=np.int32)
    values = np.empty((n_rows, n_neighbours), dtype=np.float64)
    for start in range(0, n_rows, _KNN_CHUNK_ROWS):
        block = embeddings[start : start + _KNN_CHUNK_ROWS] @ embeddings.T
        nearest = np.argpartition(-block, n_neighbours - 1, axis=1)[:, :n_neighbours]
        columns[start : start + len(block)] = nearest
        values[start : start + len(block)] = (1.0 + np.take_along_axis(block, nearest, axis=1)) / 2.0
    indptr = np.arange(0, n_rows * n_neighbours + 1, n_neighbours)
    return csr_matrix((values.ravel(), columns.ravel(), indptr), shape=(n_rows, n_rows))


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
