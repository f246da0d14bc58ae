"""Stage 1d: inside each cluster, pair rows whose cosine similarity is at least τ.

Greedy from the most similar pair down, each row in at most one pair. The result is a pairs
``Dataset`` (one row per pair) that stage 2 maps over.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from datasets import Dataset, Features, Value

from mergeit_hf.clustering import iter_embeddings
from mergeit_hf.config import MergeItConfig

_SIDE_FIELDS = ("id", "instruction", "input", "output")
PAIR_FEATURES = Features(
    {
        "pair_id": Value("string"),
        "cluster_id": Value("int32"),
        "similarity": Value("float32"),
        **{f"{side}_{name}": Value("string") for side in ("a", "b") for name in _SIDE_FIELDS},
    }
)


@dataclass(frozen=True)
class PairMatch:
    """Positions of two rows in the searched dataset and their cosine similarity."""

    a: int
    b: int
    similarity: float


def match_cluster(embeddings: np.ndarray, tau: float) -> list[tuple[int, int, float]]:
    """Greedy matching inside one cluster; returns (i, j, similarity) with i < j, local positions."""
    if len(embeddings) < 2:
        return []
    similarity = embeddings @ embeddings.T
    upper_i, upper_j = np.triu_indices(len(embeddings), k=1)
    scores = similarity[upper_i, upper_j]
    keep = scores >= tau
    upper_i, upper_j, scores = upper_i[keep], upper_j[keep], scores[keep]
    # Most similar first; ties broken by position so the matching is deterministic.
    order = np.lexsort((upper_j, upper_i, -scores))
    used = np.zeros(len(embeddings), dtype=bool)
    matches = []
    for k in order:
        i, j = upper_i[k], upper_j[k]
        if not used[i] and not used[j]:
            used[i] = used[j] = True
            matches.append((int(i), int(j), float(scores[k])))
    return matches


def find_pair_matches(dataset: Dataset, tau: float) -> list[PairMatch]:
    """All pairs of ``dataset`` (positions), cluster by cluster."""
    for column in ("id", "cluster_id", "embedding"):
        if column not in dataset.column_names:
            raise KeyError(f"pairing needs the {column!r} column; the dataset has {dataset.column_names}")
    if len(dataset) == 0:
        return []
    clusters = np.asarray(dataset["cluster_id"])
    embeddings = np.concatenate(list(iter_embeddings(dataset)))
    matches = []
    for cluster in np.unique(clusters):
        rows = np.flatnonzero(clusters == cluster)
        for i, j, score in match_cluster(embeddings[rows], tau):
            matches.append(PairMatch(int(rows[i]), int(rows[j]), score))
    return matches


def find_pairs(dataset: Dataset, config: MergeItConfig | None = None, tau: float | None = None) -> Dataset:
    """The pairs ``Dataset``: both sides' fields and ids, ``cluster_id`` and ``similarity``."""
    tau = (config or MergeItConfig()).tau if tau is None else tau
    matches = find_pair_matches(dataset, tau)
    columns: dict[str, list] = {name: [] for name in PAIR_FEATURES}
    source = {name: dataset[name] for name in (*_SIDE_FIELDS, "cluster_id")}
    for match in matches:
        columns["pair_id"].append(f"{source['id'][match.a]}+{source['id'][match.b]}")
        columns["cluster_id"].append(source["cluster_id"][match.a])
        columns["similarity"].append(match.similarity)
        for side, position in (("a", match.a), ("b", match.b)):
            for name in _SIDE_FIELDS:
                columns[f"{side}_{name}"].append(source[name][position])
    return Dataset.from_dict(columns, features=PAIR_FEATURES)


def pairs_against_tau(dataset: Dataset, taus: list[float]) -> list[tuple[float, int, int]]:
    """(τ, pairs, rows paired) for each τ: the measurement behind the default τ."""
    table = []
    for tau in taus:
        matches = find_pair_matches(dataset, tau)
        table.append((tau, len(matches), 2 * len(matches)))
    return table
