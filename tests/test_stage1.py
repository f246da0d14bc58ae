"""Stage 1 on real data with the real all-MiniLM-L6-v2 weights."""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from datasets import Dataset, load_from_disk
from datasets.fingerprint import Hasher

import mergeit_hf
from mergeit_hf import MergeItConfig, embed_batch, run_stage1
from mergeit_hf.stage1.pairs import find_pairs, match_cluster
from mergeit_hf.stage1.selection import (
    allocate_budget,
    facility_location_ranking,
    facility_location_value,
    plan_selection,
)
from mergeit_hf.stage1.topics import fit_topics


def test_embedding_is_normalised_float32(roleplay_stage1):
    vectors = np.asarray(roleplay_stage1.rows.with_format("numpy")["embedding"])
    assert vectors.dtype == np.float32 and vectors.shape[1] == 384
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_pairs_lie_inside_one_cluster_above_tau(roleplay_stage1, small_config):
    selected = roleplay_stage1.selected
    index = {row_id: i for i, row_id in enumerate(selected["id"])}
    vectors = np.asarray(selected.with_format("numpy")["embedding"])
    clusters = selected["cluster_id"]
    assert roleplay_stage1.n_pairs > 10
    for pair in roleplay_stage1.pairs:
        a, b = index[pair["a_id"]], index[pair["b_id"]]
        assert clusters[a] == clusters[b] == pair["cluster_id"]
        assert float(vectors[a] @ vectors[b]) == pytest.approx(pair["similarity"], abs=1e-5)
        assert pair["similarity"] >= small_config.tau
        assert pair["a_instruction"] == selected[a]["instruction"]


def test_no_row_is_in_two_pairs(roleplay_stage1):
    sides = Counter(list(roleplay_stage1.pairs["a_id"]) + list(roleplay_stage1.pairs["b_id"]))
    assert max(sides.values()) == 1


def test_greedy_matching_takes_the_most_similar_first():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(40, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    matches = match_cluster(vectors, tau=0.2)
    similarity = vectors @ vectors.T
    used: set[int] = set()
    for (i, j), score in matches:  # each match is the best pair among rows still free
        free = [k for k in range(40) if k not in used]
        best = max(similarity[p, q] for p in free for q in free if p < q)
        assert score == pytest.approx(best, abs=1e-6)
        used |= {i, j}
    leftovers = [k for k in range(40) if k not in used]
    assert all(similarity[p, q] < 0.2 for p in leftovers for q in leftovers if p < q)


def test_groups_grow_pairs_by_complete_linkage_on_real_rows(roleplay_stage1, small_config):
    selected = roleplay_stage1.selected
    vectors = np.asarray(selected["embedding"], dtype=np.float32)
    position = {row_id: i for i, row_id in enumerate(selected["id"])}
    pairs = find_pairs(selected, small_config)
    groups = find_pairs(selected, dataclasses.replace(small_config, max_group_size=5))
    assert set(pairs["group_size"]) == {2} and all(more == [] for more in pairs["more_sources"])
    members = [pair_id.split("+") for pair_id in groups["pair_id"]]
    assert [len(m) for m in members] == groups["group_size"] and max(groups["group_size"]) > 2
    flat = [row_id for group in members for row_id in group]
    assert len(flat) == len(set(flat))  # disjoint
    for group, row, similarity in zip(members, groups, groups["similarity"], strict=True):
        ids = [position[i] for i in group]
        inside = vectors[ids] @ vectors[ids].T
        assert inside[np.triu_indices(len(ids), 1)].min() >= small_config.tau - 1e-6  # every member with every other
        assert similarity == pytest.approx(inside[np.triu_indices(len(ids), 1)].min(), abs=1e-5)
        assert len({selected[i]["cluster_id"] for i in ids}) == 1
        assert [row["a_id"], row["b_id"], *(m["id"] for m in row["more_sources"])] == group
    # Each group starts from a pair the pair matching would make first: as many rows grouped, or more.
    assert len(flat) >= 2 * len(pairs) and groups[0]["a_id"] == pairs[0]["a_id"]


def test_selection_has_the_budgeted_size(roleplay_stage1):
    assert roleplay_stage1.n_selected == round(0.5 * roleplay_stage1.n_rows)
    rows = roleplay_stage1.rows
    plan = plan_selection(rows, MergeItConfig(selection_budget=37, n_clusters=12))
    assert plan.n_selected == 37
    sizes = Counter(rows["cluster_id"])
    for cluster, quota in plan.quota_by_cluster.items():
        assert quota <= sizes[cluster]


def test_authors_preset_keeps_a_fixed_count_per_cluster(roleplay_stage1):
    plan = plan_selection(roleplay_stage1.rows, MergeItConfig.authors_scripts(per_cluster_budget=5))
    sizes = Counter(roleplay_stage1.rows["cluster_id"])
    assert plan.quota_by_cluster == {c: min(5, n) for c, n in sizes.items()}
    assert plan.n_selected == sum(min(5, n) for n in sizes.values())


def test_budget_split_by_size_is_exact():
    quotas = allocate_budget({0: 50, 1: 30, 2: 15, 3: 5}, 0.19, None)
    assert sum(quotas.values()) == 19 and quotas[0] >= quotas[1] >= quotas[2] >= quotas[3]
    assert allocate_budget({0: 3, 1: 2}, 1000, None) == {0: 3, 1: 2}


def test_selection_ranks_are_the_greedy_order(roleplay_stage1):
    rows = roleplay_stage1.rows
    ranks = [r for r, keep in zip(rows["selection_rank"], rows["selected"], strict=True) if keep]
    assert min(ranks) == 0 and all(r >= 0 for r in ranks)
    assert all(r == -1 for r, keep in zip(rows["selection_rank"], rows["selected"], strict=True) if not keep)


def test_huge_clusters_select_by_pieces_near_the_whole_cluster_objective(roleplay_stage1):
    vectors = np.asarray(roleplay_stage1.rows.with_format("numpy")["embedding"], dtype=np.float32)
    whole = facility_location_ranking(vectors, 80, seed=0)
    pieces = facility_location_ranking(vectors, 80, seed=0, dense_limit=100)  # 400 real rows in pieces of 100
    assert len(pieces) == len(set(pieces)) == 80 and pieces != whole
    ratio = facility_location_value(vectors, pieces) / facility_location_value(vectors, whole)
    assert 0.98 <= ratio <= 1.01, ratio  # greedy is not optimal: pieces may even do a little better


def test_fixed_seed_gives_identical_output(roleplay_rows, roleplay_stage1, small_config):
    again = run_stage1(roleplay_rows, small_config)
    assert again.rows["cluster_id"] == roleplay_stage1.rows["cluster_id"]
    assert again.selected["id"] == roleplay_stage1.selected["id"]
    assert again.pairs.to_list() == roleplay_stage1.pairs.to_list()


def test_streamed_minibatch_kmeans_above_threshold(roleplay_stage1):
    config = MergeItConfig(n_clusters=12, minibatch_kmeans_above=100, seed=3)
    first = fit_topics(roleplay_stage1.rows, config)
    second = fit_topics(roleplay_stage1.rows, config)
    assert first.method == "minibatch_kmeans" and first.n_clusters == 12
    assert np.array_equal(first.centroids, second.centroids)


def test_never_more_clusters_than_rows(roleplay_stage1):
    few = roleplay_stage1.rows.select(range(9))
    assert fit_topics(few, MergeItConfig()).n_clusters == 9


def test_functions_hash_identically_across_processes(roleplay_stage1):
    """datasets fingerprints map functions; the same stage must hash the same in a new process."""
    code = (
        "from datasets.fingerprint import Hasher; import mergeit_hf; "
        "print(Hasher.hash(mergeit_hf.embed_batch)); print(Hasher.hash(mergeit_hf.Embedder(batch_size=8)))"
    )
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert printed.split() == [Hasher.hash(embed_batch), Hasher.hash(mergeit_hf.Embedder(batch_size=8))]
    assert Hasher.hash(roleplay_stage1.topics) == Hasher.hash(roleplay_stage1.topics)
    assert Hasher.hash(roleplay_stage1.plan) == Hasher.hash(roleplay_stage1.plan)


def test_second_identical_map_is_a_cache_hit(tmp_path, roleplay_rows, caplog):
    roleplay_rows.select(range(64)).save_to_disk(str(tmp_path / "rows"))
    on_disk = load_from_disk(str(tmp_path / "rows"))
    with caplog.at_level(logging.WARNING):
        first = on_disk.map(embed_batch, batched=True)
        second = on_disk.map(embed_batch, batched=True)
    assert first.cache_files and first.cache_files == second.cache_files
    assert "couldn't be hashed" not in caplog.text and "hashed properly" not in caplog.text


def test_num_proc_two_gives_the_same_embeddings(roleplay_rows):
    rows = roleplay_rows.select(range(48))
    single = np.asarray(rows.map(embed_batch, batched=True, batch_size=8).with_format("numpy")["embedding"])
    multi = rows.map(embed_batch, batched=True, batch_size=8, num_proc=2)
    assert np.allclose(single, np.asarray(multi.with_format("numpy")["embedding"]), atol=1e-5)


def test_unbatched_map_and_missing_columns():
    rows = Dataset.from_dict({"instruction": ["Name a prime number."], "input": [""]})
    one = rows.map(embed_batch)
    assert len(one[0]["embedding"]) == 384
    with pytest.raises(KeyError, match="embedding needs column"):
        Dataset.from_dict({"prompt": ["x"]}).map(embed_batch, batched=True)


def test_pca_before_kmeans_keeps_the_asked_share_of_variance(roleplay_stage1, small_config):
    rows = roleplay_stage1.rows
    topics = fit_topics(rows, dataclasses.replace(small_config, pca_variance=0.95))
    vectors = np.asarray(rows["embedding"], dtype=np.float32)
    projected = topics.project(vectors)
    dims = topics.pca_components.shape[1]
    assert topics.method == f"pca {dims}d + kmeans" and 10 < dims < vectors.shape[1]
    centered = vectors - vectors.mean(axis=0)
    kept = ((projected - projected.mean(axis=0)) ** 2).sum() / (centered**2).sum()
    assert kept >= 0.95 - 0.01  # PCA was fitted on this very set: the share it keeps is the share asked for
    labels = rows.map(topics, batched=True)["cluster_id"]
    assert len(set(labels)) == topics.n_clusters == small_config.n_clusters
    nearest = ((projected[:, None, :] - topics.centroids[None]) ** 2).sum(-1).argmin(1)
    assert list(nearest) == list(labels)  # rows go to the nearest centroid in the PCA space


def _topic_mixture(n_rows: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n_rows, 384)).astype(np.float32)
    vectors[: n_rows // 2] += rng.normal(size=384).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_stage1_s_products_do_not_change_with_blas_threads_or_batches():
    """A Ray worker runs one thread, the driver every core: selection, pairs and topics must not change with
    that. With float32 products the 9,000-row cluster below (cut in pieces) ranked differently; at a million
    rows k-means on two threads cut large topics into other pieces than on one (8,134 rows apart)."""
    from threadpoolctl import threadpool_limits

    from mergeit_hf.stage1.topics import TopicClusters

    vectors = _topic_mixture(9_000)
    topics = TopicClusters(vectors[::450].copy())
    many_threads = (
        facility_location_ranking(vectors, 1_800, 0),
        match_cluster(vectors[:3_000], 0.2),
        topics.assign(vectors),
    )
    with threadpool_limits(limits=1):  # BLAS and OpenMP, as in a Ray worker
        one_thread = (
            facility_location_ranking(vectors, 1_800, 0),
            match_cluster(vectors[:3_000], 0.2),
            np.concatenate([topics.assign(vectors[start : start + 700]) for start in range(0, 9_000, 700)]),
        )
    assert many_threads[0] == one_thread[0]
    assert many_threads[1] == one_thread[1]  # the same groups, with bit-identical similarities
    assert np.array_equal(many_threads[2], one_thread[2])
