"""Stage 2 throughput against a local llama.cpp server, side by side in one run.

For concurrency 1, 2, 4 and 8: our Merger (fresh cache, so every request is sent) against a bare asyncio
loop that posts exactly the same requests (replayed from our cache) at the same concurrency; plus
one-request-at-a-time, as the authors' scripts do. Sides alternate so drift in machine load hits both.
llama_cpp.server answers one request at a time, so concurrency cannot beat 1 here; the ratios show
what our client costs, and a TGI server with continuous batching is where concurrency pays.
Run: cd bench && ../.venv/bin/python merge.py [--pairs N]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import httpx
from _common import shared_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mergeit_hf as m
from mergeit_hf.merging import Merger
from mergeit_hf.request_cache import RequestCache
from tests.helpers.servers import LlamaServer

CONCURRENCY = (1, 2, 4, 8)


def ours(pairs, url: str, concurrency: int, config: m.MergeItConfig) -> tuple[float, list[dict]]:
    cache_dir = tempfile.mkdtemp(prefix="bench-cache-")
    merger = Merger(
        endpoint=url, config=m.MergeItConfig(**{**config.to_dict(), "concurrency": concurrency}), cache_dir=cache_dir
    )
    started = time.perf_counter()
    pairs.map(merger, batched=True, batch_size=len(pairs), load_from_cache_file=False)
    seconds = time.perf_counter() - started
    cache = RequestCache(cache_dir)
    payloads = cache.payloads()
    cache.close()
    return seconds, payloads


async def bare(url: str, payloads: list[dict], concurrency: int) -> float:
    """The floor: the same request bodies posted with httpx, nothing else."""
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600) as client:

        async def post(payload: dict) -> None:
            body = {"model": "bench", "messages": payload["messages"], **payload["params"]}
            async with semaphore:
                (await client.post(f"{url}/v1/chat/completions", json=body)).raise_for_status()

        started = time.perf_counter()
        await asyncio.gather(*(post(p) for p in payloads))
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=6)
    args = parser.parse_args()
    rows, _ = m.load_rows(shared_file("gpteacher_roleplay.json"))
    stage1 = m.run_stage1(rows.select(range(400)), m.MergeItConfig(n_clusters=12, selection_budget=0.5, tau=0.55))
    pairs = stage1.pairs.select(range(min(args.pairs, stage1.n_pairs)))
    config = m.MergeItConfig(max_new_tokens=128, top_logprobs=1000, max_missing_score_fraction=1.0)
    server = LlamaServer.start(Path(tempfile.mkdtemp()))
    try:
        ours(pairs.select(range(1)), server.url, 1, config)  # warm the server's weights
        print(f"{len(pairs)} pairs (roleplay, real), llama.cpp server with SmolLM2-135M, max_new_tokens=128")
        print("| concurrency | ours merges/s | bare loop merges/s | ours / bare |")
        print("|---|---|---|---|")
        sequential, ours_times = 0.0, []
        for concurrency in CONCURRENCY:
            ours_s, payloads = ours(pairs, server.url, concurrency, config)
            bare_s = asyncio.run(bare(server.url, payloads, concurrency))
            if concurrency == 1:
                sequential = asyncio.run(bare(server.url, payloads, 1))
            print(f"| {concurrency} | {len(pairs) / ours_s:.3f} | {len(pairs) / bare_s:.3f} | {bare_s / ours_s:.3f} |")
            ours_times.append(ours_s)
        print(
            f"RATIO ours (best concurrency) / one request at a time (authors' scripts): "
            f"{sequential / min(ours_times):.3f}"
        )
        print(f"({len(payloads)} requests per run: a merge and three quality scores per pair)")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
