"""Stage 1d: inside each cluster, group rows whose cosine similarity is at least τ.

Greedy from the most similar pair down, each row in at most one group. With ``max_group_size`` k > 2
(the authors' scripts merge up to 5 rows), a group grows from its pair by the unused row most similar
on average to the members, as long as that row is at least τ-similar to *every* member (complete
linkage: no member is merged with a row unlike it), up to k rows. At k = 2 this is the paper's pairing.

The result is a pairs ``Dataset`` (one row per group) that stage 2 maps over. The first two members are
the ``a_*`` and ``b_*`` columns whatever k is; members 3..k are ``more_sources``, a list of
{id, instruction, input, output} (empty for pairs), so pairs read as before and the Hub viewer shows a
group as one row. ``similarity`` is the smallest pairwise similarity inside the group.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from datasets import Dataset, Features, Value

from mergeit_hf.config import MergeItConfig
from mergeit_hf.embeddings.arrow import column_values, take_embeddings

_SIDE_FIELDS = ("id", "instruction", "input", "output")
_CANDIDATE_BLOCK = 8192
SOURCE_STRUCT = {name: Value("string") for name in _SIDE_FIELDS}
PAIR_FEATURES = Features(
    {
        "pair_id": Value("string"),
        "cluster_id": Value("int32"),
        "similarity": Value("float32"),
        **{f"{side}_{name}": Value("string") for side in ("a", "b") for name in _SIDE_FIELDS},
        "group_size": Value("int32"),
        "more_sources": [SOURCE_STRUCT],
    }
)


@dataclass(frozen=True)
class PairMatch:
    """Positions of a group's rows in the searched dataset (two for a pair) and their smallest similarity."""

    members: tuple[int, ...]
    similarity: float

    @property
    def a(self) -> int:
        return self.members[0]

    @property
    def b(self) -> int:
        return self.members[1]


def match_cluster(embeddings: np.ndarray, tau: float, max_group_size: int = 2) -> list[tuple[tuple[int, ...], float]]:
    """Greedy disjoint groups inside one cluster: (local positions, smallest pairwise similarity)."""
    if len(embeddings) < 2:
        return []
    similarity = embeddings @ embeddings.T
    upper_i, upper_j = np.triu_indices(len(embeddings), k=1)
    scores = similarity[upper_i, upper_j]
    keep = scores >= tau
    upper_i, upper_j, scores = upper_i[keep], upper_j[keep], scores[keep]
    # Most similar first; ties broken by position so the matching is deterministic.
    order = np.lexsort((upper_j, upper_i, -scores))
    upper_i, upper_j = upper_i[order], upper_j[order]
    used = np.zeros(len(embeddings), dtype=bool)
    groups = []
    # A dense topic has a million candidate pairs, nearly all with a row already taken: each block drops
    # those in numpy first, and only the rest go through the (order-dependent) loop.
    for start in range(0, len(upper_i), _CANDIDATE_BLOCK):
        if used.sum() > len(used) - 2:
            break  # every row is in a group
        block_i, block_j = upper_i[start : start + _CANDIDATE_BLOCK], upper_j[start : start + _CANDIDATE_BLOCK]
        open_ = ~(used[block_i] | used[block_j])
        for i, j in zip(block_i[open_].tolist(), block_j[open_].tolist(), strict=True):
            if not used[i] and not used[j]:
                members = _grow([i, j], similarity, used, tau, max_group_size)
                used[members] = True
                inside = similarity[np.ix_(members, members)][np.triu_indices(len(members), k=1)]
                groups.append((tuple(members), float(inside.min())))
    return groups


def _grow(members: list[int], similarity: np.ndarray, used: np.ndarray, tau: float, size: int) -> list[int]:
    while len(members) < size:
        free = ~used
        free[members] = False
        to_members = similarity[:, members]
        eligible = free & (to_members.min(axis=1) >= tau)
        if not eligible.any():
            break
        mean = np.where(eligible, to_members.mean(axis=1), -np.inf)
        members.append(int(np.argmax(mean)))  # the first of equals: deterministic
    return members


def find_pair_matches(dataset: Dataset, tau: float, max_group_size: int = 2) -> list[PairMatch]:
    """All groups of ``dataset`` (positions), cluster by cluster."""
    for column in ("id", "cluster_id", "embedding"):
        if column not in dataset.column_names:
            raise KeyError(f"pairing needs the {column!r} column; the dataset has {dataset.column_names}")
    if len(dataset) == 0:
        return []
    clusters = np.asarray(column_values(dataset, "cluster_id"))
    matches = []
    for cluster in np.unique(clusters):  # one cluster's embeddings in memory at a time
        rows = np.flatnonzero(clusters == cluster)
        for members, score in match_cluster(take_embeddings(dataset, rows), tau, max_group_size):
            matches.append(PairMatch(tuple(int(rows[m]) for m in members), score))
    return matches


def find_pairs(dataset: Dataset, config: MergeItConfig | None = None, tau: float | None = None) -> Dataset:
    """The pairs ``Dataset`` (one row per group): members' fields and ids, ``cluster_id``, ``similarity``."""
    config = config or MergeItConfig()
    tau = config.tau if tau is None else tau
    matches = find_pair_matches(dataset, tau, config.max_group_size)
    source = {name: column_values(dataset, name) for name in SOURCE_COLUMNS}
    return Dataset.from_dict(pair_columns(matches, source), features=PAIR_FEATURES)


#: What a pairs row copies of each member (``pair_columns``' ``source``).
SOURCE_COLUMNS = (*_SIDE_FIELDS, "cluster_id")


def pair_columns(matches: list[PairMatch], source: dict[str, list]) -> dict[str, list]:
    """Pairs rows (``PAIR_FEATURES``) for matches over rows whose ``SOURCE_COLUMNS`` are ``source``."""
    columns: dict[str, list] = {name: [] for name in PAIR_FEATURES}
    row = lambda position: {name: source[name][position] for name in _SIDE_FIELDS}  # noqa: E731
    for match in matches:
        columns["pair_id"].append("+".join(source["id"][m] for m in match.members))
        columns["cluster_id"].append(source["cluster_id"][match.a])
        columns["similarity"].append(match.similarity)
        for side, position in (("a", match.a), ("b", match.b)):
            for name in _SIDE_FIELDS:
                columns[f"{side}_{name}"].append(source[name][position])
        columns["group_size"].append(len(match.members))
        columns["more_sources"].append([row(m) for m in match.members[2:]])
    return columns


def group_sources(group: dict) -> list[dict[str, str]]:
    """Every member of one pairs row, in order: a, b, then ``more_sources`` (id, instruction, input, output)."""
    pair = [{name: group[f"{side}_{name}"] or "" for name in _SIDE_FIELDS} for side in ("a", "b")]
    more = [{name: source.get(name) or "" for name in _SIDE_FIELDS} for source in group.get("more_sources") or []]
    return pair + more


def pairs_against_tau(dataset: Dataset, taus: list[float], max_group_size: int = 2) -> list[tuple[float, int, int]]:
    """(τ, groups, rows grouped) for each τ: the measurement behind the default τ."""
    table = []
    for tau in taus:
        matches = find_pair_matches(dataset, tau, max_group_size)
        table.append((tau, len(matches), sum(len(m.members) for m in matches)))
    return table
