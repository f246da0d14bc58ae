"""Stage 1d: inside each cluster, group rows whose cosine similarity is at least τ.

Greedy from the most similar pair down, each row in at most one group. With ``max_group_size`` k > 2
(the authors' scripts merge up to 5 rows), a group grows from its pair by the unused row most similar
on average to the members, as long as that row is at least τ-similar to *every* member (complete
linkage: no member is merged with a row unlike it), up to k rows. At k = 2 this is the paper's pairing.

The result is a pairs ``Dataset`` (one row per group) that stage 2 maps over. The first two members are
the ``a_*`` and ``b_*`` columns whatever k is; members 3..k are ``more_sources``, a list of
{id, instruction, input, output, messages} (empty for pairs), so pairs read as before and the Hub viewer
shows a group as one row. ``similarity`` is the smallest pairwise similarity inside the group.

Conversations: rows pair only with rows of the same system prompt (or both none), which the group keeps in
``system``; a multi-turn conversation pairs with nothing (it is selected or not, whole). Each member keeps
its turns (``messages``) so a group that is not merged gives back its originals as they came.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from datasets import Dataset, Features, Value

from mergeit_hf.config import MergeItConfig
from mergeit_hf.embeddings.arrow import column_values, take_embeddings
from mergeit_hf.inputs.loading import MESSAGES_FEATURE
from mergeit_hf.stage1.dot import dot_products

_TEXT_FIELDS = ("id", "instruction", "input", "output")
_SIDE_FIELDS = (*_TEXT_FIELDS, "messages")
_CANDIDATE_BLOCK = 8192
SOURCE_STRUCT = {**{name: Value("string") for name in _TEXT_FIELDS}, "messages": MESSAGES_FEATURE}
PAIR_FEATURES = Features(
    {
        "pair_id": Value("string"),
        "cluster_id": Value("int32"),
        "similarity": Value("float32"),
        "system": Value("string"),  # the system prompt every member shares ("" if none)
        **{f"{side}_{name}": SOURCE_STRUCT[name] for side in ("a", "b") for name in _SIDE_FIELDS},
        "group_size": Value("int32"),
        "more_sources": [SOURCE_STRUCT],
    }
)
#: What a row without it (an Alpaca row, a dataset built by hand) holds in the conversation columns.
_CONVERSATION_DEFAULTS = {"system": "", "messages": [], "multi_turn": False}


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
    similarity = dot_products(embeddings, embeddings)  # the same in both engines (see ``dot``)
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
    """All groups of ``dataset`` (positions), topic by topic and system prompt by system prompt."""
    for column in ("id", "cluster_id", "embedding"):
        if column not in dataset.column_names:
            raise KeyError(f"pairing needs the {column!r} column; the dataset has {dataset.column_names}")
    if len(dataset) == 0:
        return []
    keys = pairing_keys(
        np.asarray(column_values(dataset, "cluster_id")),
        _column(dataset, "system"),
        np.asarray(_column(dataset, "multi_turn"), dtype=bool),
    )
    matches = []
    for rows in _groups(keys):  # one group's embeddings in memory at a time
        for members, score in match_cluster(take_embeddings(dataset, rows), tau, max_group_size):
            matches.append(PairMatch(tuple(int(rows[m]) for m in members), score))
    return matches


def _groups(keys: np.ndarray) -> list[np.ndarray]:
    """Positions of each key's rows (ascending), keys in ascending order, -1 left out; one sort for all
    (a scan per key would cost rows × groups with many system prompts)."""
    if len(keys) == 0:
        return []
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = [*starts[1:], len(keys)]
    return [
        order[start:end] for start, end in zip(starts, ends, strict=True) if ordered[start] >= 0 and end - start > 1
    ]


def pairing_keys(clusters: np.ndarray, systems: list[str], multi_turn: np.ndarray) -> np.ndarray:
    """The group each row may pair inside: its topic and its system prompt, numbered topic by topic (so
    rows without system prompts pair exactly as topics alone would); -1 for a multi-turn conversation."""
    systems = [s or "" for s in systems]  # None (a column built by hand) is no system prompt, as "" is
    names = {name: number for number, name in enumerate(sorted(set(systems)))}
    system_numbers = np.fromiter((names[s] for s in systems), dtype=np.int64, count=len(systems))
    keys = clusters.astype(np.int64) * max(1, len(names)) + system_numbers
    keys[multi_turn] = -1
    return keys


def _column(dataset: Dataset, name: str) -> list:
    if name in dataset.column_names:
        return column_values(dataset, name)
    return [_CONVERSATION_DEFAULTS[name]] * len(dataset)


def find_pairs(dataset: Dataset, config: MergeItConfig | None = None, tau: float | None = None) -> Dataset:
    """The pairs ``Dataset`` (one row per group): members' fields and ids, ``cluster_id``, ``similarity``."""
    config = config or MergeItConfig()
    tau = config.tau if tau is None else tau
    matches = find_pair_matches(dataset, tau, config.max_group_size)
    return Dataset.from_dict(pair_columns(matches, source_values(dataset)), features=PAIR_FEATURES)


def source_values(dataset: Dataset) -> dict[str, list]:
    """The ``SOURCE_COLUMNS`` of every row, as ``pair_columns`` reads them (defaults where a column is absent)."""
    return {
        name: _column(dataset, name) if name in _CONVERSATION_DEFAULTS else column_values(dataset, name)
        for name in SOURCE_COLUMNS
    }


#: What a pairs row copies of each member (``pair_columns``' ``source``).
SOURCE_COLUMNS = (*_SIDE_FIELDS, "cluster_id", "system")


def pair_columns(matches: list[PairMatch], source: dict[str, list]) -> dict[str, list]:
    """Pairs rows (``PAIR_FEATURES``) for matches over rows whose ``SOURCE_COLUMNS`` are ``source``."""
    columns: dict[str, list] = {name: [] for name in PAIR_FEATURES}
    row = lambda position: {name: source[name][position] for name in _SIDE_FIELDS}  # noqa: E731
    for match in matches:
        columns["pair_id"].append("+".join(source["id"][m] for m in match.members))
        columns["cluster_id"].append(source["cluster_id"][match.a])
        columns["similarity"].append(match.similarity)
        columns["system"].append(source["system"][match.a])
        for side, position in (("a", match.a), ("b", match.b)):
            for name in _SIDE_FIELDS:
                columns[f"{side}_{name}"].append(source[name][position])
        columns["group_size"].append(len(match.members))
        columns["more_sources"].append([row(m) for m in match.members[2:]])
    return columns


def group_sources(group: dict) -> list[dict[str, str]]:
    """Every member of one pairs row, in order: a, b, then ``more_sources`` (id, instruction, input, output)."""
    pair = [{name: group[f"{side}_{name}"] or "" for name in _TEXT_FIELDS} for side in ("a", "b")]
    more = [{name: source.get(name) or "" for name in _TEXT_FIELDS} for source in group.get("more_sources") or []]
    return pair + more


def group_conversations(group: dict) -> list[list[dict[str, str]]]:
    """Each member's turns as they came, in group order ([] for a member that was an Alpaca row)."""
    sides = [group.get(f"{side}_messages") or [] for side in ("a", "b")]
    return sides + [source.get("messages") or [] for source in group.get("more_sources") or []]


def pairs_against_tau(dataset: Dataset, taus: list[float], max_group_size: int = 2) -> list[tuple[float, int, int]]:
    """(τ, groups, rows grouped) for each τ: the measurement behind the default τ."""
    table = []
    for tau in taus:
        matches = find_pair_matches(dataset, tau, max_group_size)
        table.append((tau, len(matches), sum(len(m.members) for m in matches)))
    return table
