"""Stage 1 throughput on ../shared/data/gpteacher_toolformer.json, with side-by-side ratios.

Prints rows/s and peak memory per stage, then, measured in this same run:
- embedding: our ``ds.map(Embedder(), batched=True)`` ÷ a plain ``SentenceTransformer.encode`` of the
  same texts (interleaved halves, so drift in machine load hits both sides alike); aim >= 0.95;
- pairs: our per-cluster search ÷ a naive global n×n similarity search giving the same pairs.
Run: cd bench && ../.venv/bin/python stage1.py [--rows N]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _common import peak_rss_mib, shared_file

import mergeit_hf as m
from mergeit_hf.embeddings.embedder import Embedder, join_text, load_model
from mergeit_hf.stage1.pairs import find_pair_matches, match_cluster
from mergeit_hf.stage1.selection import is_selected, plan_selection
from mergeit_hf.stage1.topics import fit_topics


def timed(label: str, n_rows: int, work):
    started = time.perf_counter()
    result = work()
    seconds = time.perf_counter() - started
    print(f"{label:<22} {seconds:8.2f} s  {n_rows / seconds:10.1f} rows/s  peak RSS {peak_rss_mib():7.0f} MiB")
    return result, seconds


def embedding_ratio(rows, embedder: Embedder) -> float:
    model = load_model(embedder.model, embedder.device)
    halves = [rows.select(range(0, len(rows) // 2)), rows.select(range(len(rows) // 2, len(rows)))]
    ours = plain = 0.0
    for index, half in enumerate(halves):
        texts = [join_text(values) for values in zip(half["instruction"], half["input"], strict=True)]
        order = ("plain", "ours") if index == 0 else ("ours", "plain")
        for side in order:
            started = time.perf_counter()
            if side == "plain":
                model.encode(texts, batch_size=embedder.batch_size, normalize_embeddings=True)
                plain += time.perf_counter() - started
            else:
                half.map(embedder, batched=True, batch_size=1024, load_from_cache_file=False)
                ours += time.perf_counter() - started
    print(f"embedding: ours {len(rows) / ours:.1f} rows/s, plain encode {len(rows) / plain:.1f} rows/s")
    return plain / ours


def naive_pairs(rows, tau: float) -> list[tuple[int, int, float]]:
    """Global n×n similarity, then the same greedy matching restricted to same-cluster pairs."""
    vectors = np.asarray(rows.with_format("numpy")["embedding"], dtype=np.float32)
    clusters = np.asarray(rows["cluster_id"])
    similarity = vectors @ vectors.T
    similarity[clusters[:, None] != clusters[None, :]] = -1.0
    return match_cluster_from_matrix(similarity, tau)


def match_cluster_from_matrix(similarity: np.ndarray, tau: float) -> list[tuple[int, int, float]]:
    upper_i, upper_j = np.triu_indices(len(similarity), k=1)
    scores = similarity[upper_i, upper_j]
    keep = scores >= tau
    upper_i, upper_j, scores = upper_i[keep], upper_j[keep], scores[keep]
    used = np.zeros(len(similarity), dtype=bool)
    matches = []
    for k in np.lexsort((upper_j, upper_i, -scores)):
        i, j = upper_i[k], upper_j[k]
        if not used[i] and not used[j]:
            used[i] = used[j] = True
            matches.append((int(i), int(j), float(scores[k])))
    return matches


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=None, help="use the first N rows only")
    args = parser.parse_args()
    config = m.MergeItConfig()
    rows, report = m.load_rows(shared_file("gpteacher_toolformer.json"))
    if args.rows:
        rows = rows.select(range(min(args.rows, len(rows))))
    n = len(rows)
    print(f"{report.source}: {n} rows; paper defaults m={config.n_clusters}, budget={config.selection_budget}")
    embedder = Embedder(config.embedding_model, config.text_columns, config.embedding_batch_size)
    load_model(embedder.model, embedder.device).encode(["warm up"])
    embedded, _ = timed("embed", n, lambda: rows.map(embedder, batched=True, batch_size=1024))
    topics, _ = timed("cluster (k-means)", n, lambda: fit_topics(embedded, config))
    clustered = embedded.map(topics, batched=True)
    plan, _ = timed("select (facility loc.)", n, lambda: plan_selection(clustered, config))
    marked = clustered.map(plan, batched=True).filter(is_selected, batched=True)
    ours, ours_s = timed("pairs (ours)", n, lambda: find_pair_matches(clustered, config.tau))
    naive, naive_s = timed("pairs (naive n×n)", n, lambda: naive_pairs(clustered, config.tau))
    assert sorted((p.a, p.b) for p in ours) == sorted((a, b) for a, b, _ in naive), "both find the same pairs"
    print(f"selected {len(marked)} rows; {len(ours)} pairs among all {n} rows at τ={config.tau}")
    ratio = embedding_ratio(rows, embedder)
    print(f"RATIO embedding throughput ours/plain encode: {ratio:.3f}  (aim >= 0.95)")
    print(f"RATIO pair search speed-up ours vs naive global n×n: {naive_s / ours_s:.1f}x")
    _ = match_cluster  # the per-cluster matcher both sides share


if __name__ == "__main__":
    main()
