"""Stage 1 at a million rows with given embeddings, on this machine: seconds and peak memory per part.

Builds a synthetic mixture (300 topics of unit vectors in 384 dimensions, the shape of all-MiniLM-L6-v2
embeddings) as an Arrow file under ~/.cache/mergeit-bench/scale, then runs ``run_stage1`` on it in a fresh
process (paper defaults: 120 topics, 19% kept, τ = 0.60), memory-mapped as a Hub or saved dataset would be.
Then, on a 50k-row subset split into 12 topics (clusters of about 4k rows, where both paths run), the
facility-location objective of selection by pieces beside today's whole-cluster dense lazy greedy.
Run: cd bench && ../.venv/bin/python scale.py [--rows 1000000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from _common import peak_rss_mib

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from datasets import Dataset

import mergeit_hf as m
from mergeit_hf.inputs.loading import ROW_FEATURES
from mergeit_hf.stage1 import selection
from mergeit_hf.stage1.selection import facility_location_ranking, facility_location_value
from mergeit_hf.stage1.topics import assign_topics

DIM, TOPICS, CHUNK = 384, 300, 20_000
FOLDER = Path.home() / ".cache" / "mergeit-bench" / "scale"


def build(n_rows: int) -> Path:
    path = FOLDER / f"synthetic-{n_rows}.arrow"
    if path.is_file():
        return path
    FOLDER.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(TOPICS, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    # Alpaca-shaped rows (no conversation columns: stage 1 reads their defaults), with their embeddings.
    fields = [
        ROW_FEATURES.arrow_schema.field(name) for name in ("id", "instruction", "input", "output", "source_index")
    ]
    schema = pa.schema(fields).append(pa.field("embedding", pa.list_(pa.float32())))
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for start in range(0, n_rows, CHUNK):
            n = min(CHUNK, n_rows - start)
            topic = rng.integers(0, TOPICS, size=n)
            vectors = centres[topic] + rng.normal(scale=0.04, size=(n, DIM)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            index = np.arange(start, start + n)
            columns = {
                "id": pa.array([f"r{i}" for i in index]),
                "instruction": pa.array(
                    [f"synthetic instruction {i} on topic {t}" for i, t in zip(index, topic, strict=True)]
                ),
                "input": pa.array([""] * n),
                "output": pa.array([f"answer {i}" for i in index]),
                "source_index": pa.array(index, pa.int64()),
                "embedding": pa.ListArray.from_arrays(
                    np.arange(0, (n + 1) * DIM, DIM, dtype=np.int32), vectors.ravel()
                ),
            }
            writer.write_batch(pa.record_batch(list(columns.values()), schema=schema))
    return path


def run_stage1_measured(path: str) -> None:
    """In a fresh process: stage 1 on the memory-mapped file; prints one JSON line."""
    rows = Dataset.from_file(path)
    started = time.perf_counter()
    stage1 = m.run_stage1(rows, m.MergeItConfig())
    total = time.perf_counter() - started
    print(json.dumps({**stage1.seconds, "total": total, "rss_mib": peak_rss_mib(), "summary": stage1.summary()}))


def objective_table(path: Path, n_rows: int = 50_000, topics: int = 12) -> None:
    rows = Dataset.from_file(str(path)).select(range(n_rows))
    stage1_rows = rows.add_column(
        "cluster_id", assign_topics(rows, m.fit_topics(rows, m.MergeItConfig(n_clusters=topics)))
    )
    vectors = np.asarray(stage1_rows.with_format("numpy")["embedding"], dtype=np.float32)
    clusters = np.asarray(stage1_rows["cluster_id"])
    quotas = selection.allocate_budget({c: int((clusters == c).sum()) for c in np.unique(clusters)}, 0.19, None)
    totals = {"dense": [0.0, 0.0], "pieces": [0.0, 0.0]}
    for cluster, quota in quotas.items():
        members = vectors[clusters == cluster]
        for name, limit in (("dense", len(members) + 1), ("pieces", selection.DENSE_CLUSTER_LIMIT)):
            started = time.perf_counter()
            chosen = facility_location_ranking(members, quota, 42, dense_limit=limit)
            totals[name][1] += time.perf_counter() - started
            totals[name][0] += facility_location_value(members, chosen)
    sizes = sorted(int((clusters == c).sum()) for c in quotas)
    print(f"\n### Selection objective on {n_rows} rows in {topics} topics ({sizes[0]}–{sizes[-1]} rows each)\n")
    print("| selection | facility-location objective | seconds |\n|---|---|---|")
    for name, (value, seconds) in totals.items():
        label = (
            "whole cluster, dense lazy greedy (before)"
            if name == "dense"
            else f"by k-means pieces of about {selection.PIECE_ROWS:,} rows"
        )
        print(f"| {label} | {value:,.1f} | {seconds:.1f} |")
    ratio = totals["pieces"][0] / totals["dense"][0]
    speed = totals["dense"][1] / totals["pieces"][1]
    print(f"\nRATIO objective pieces / dense: {ratio:.4f}; RATIO time dense / pieces: {speed:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_stage1_measured(args.child)
        return
    started = time.perf_counter()
    path = build(args.rows)
    print(f"synthetic set: {args.rows} rows × {DIM} (built or reused in {time.perf_counter() - started:.0f} s): {path}")
    child = subprocess.run([sys.executable, __file__, "--child", str(path)], capture_output=True, text=True, check=True)
    result = json.loads(child.stdout.strip().splitlines()[-1])
    print(f"\n### Stage 1 at {args.rows:,} rows, given embeddings, 2 cores\n\n{result['summary']}\n")
    print("| part | seconds |\n|---|---|")
    for part in ("embed", "cluster", "select", "pair"):
        label = {"embed": "check the given embeddings", "cluster": "topics (k-means) + assignment"}.get(part, part)
        print(f"| {label} | {result[part]:.1f} |")
    print(f"| **total** | **{result['total']:.1f}** |\n\npeak RSS of the stage 1 process: {result['rss_mib']:.0f} MiB")
    objective_table(path)


if __name__ == "__main__":
    main()
