"""Stage 2 throughput against a local llama.cpp server, side by side in one run.

For concurrency 1, 2, 4 and 8: our Merger (fresh cache, so every request is sent) against a bare asyncio
loop that posts exactly the same request bodies, in the order the server received ours, at the same
concurrency (order matters: llama.cpp reuses the KV cache of the previous prompt's prefix); plus
one request at a time, as the authors' scripts do. Both go through a pass-through proxy that records
when the server was busy, because llama.cpp's answers are not constant work: its KV-prefix reuse
depends on request order and shifts greedy outputs, so the same bodies can take different server time.
Printed per row: raw merges/s of each side, the raw ratio, and the ratio of server utilisation
(busy time / wall time), which is what the client controls. llama_cpp.server answers one request at a
time, so concurrency cannot beat 1 here; a TGI server with continuous batching is where it pays.
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
from tests.helpers.servers import FaultProxy, LlamaServer

CONCURRENCY = (1, 2, 4, 8)


def ours(pairs, url: str, concurrency: int, config: m.MergeItConfig) -> tuple[float, int]:
    cache_dir = tempfile.mkdtemp(prefix="bench-cache-")
    merger = Merger(
        endpoint=url, config=m.MergeItConfig(**{**config.to_dict(), "concurrency": concurrency}), cache_dir=cache_dir
    )
    started = time.perf_counter()
    pairs.map(merger, batched=True, batch_size=len(pairs), load_from_cache_file=False)
    seconds = time.perf_counter() - started
    cache = RequestCache(cache_dir)
    sent = len(cache)
    cache.close()
    return seconds, sent


async def bare(url: str, bodies: list[bytes], concurrency: int) -> float:
    """The floor: the same request bodies posted with httpx, in the same order, nothing else."""
    semaphore = asyncio.Semaphore(concurrency)
    headers = {"Content-Type": "application/json"}
    async with httpx.AsyncClient(timeout=600) as client:

        async def post(body: bytes) -> None:
            async with semaphore:
                (await client.post(f"{url}/v1/chat/completions", content=body, headers=headers)).raise_for_status()

        started = time.perf_counter()
        await asyncio.gather(*(post(body) for body in bodies))
        return time.perf_counter() - started


def busy_seconds(spans: list[tuple[float, float]]) -> float:
    """Time the server had at least one request in hand (union of the answered requests' spans)."""
    busy, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        busy += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return busy


def measured(proxy: FaultProxy, run) -> tuple[float, float, object]:
    proxy.spans = []
    started = time.perf_counter()
    result = run()
    wall = time.perf_counter() - started
    return wall, busy_seconds(proxy.spans) / wall, result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=4)
    args = parser.parse_args()
    rows, _ = m.load_rows(shared_file("gpteacher_roleplay.json"))
    stage1 = m.run_stage1(rows.select(range(400)), m.MergeItConfig(n_clusters=12, selection_budget=0.5, tau=0.55))
    pairs = stage1.pairs.select(range(min(args.pairs, stage1.n_pairs)))
    config = m.MergeItConfig(max_new_tokens=128, top_logprobs=1000, max_missing_score_fraction=1.0)
    server = LlamaServer.start(Path(tempfile.mkdtemp()))
    proxy = FaultProxy(server.url).start()
    try:
        ours(pairs.select(range(1)), proxy.url, 1, config)  # warm the server's weights
        print(f"{len(pairs)} pairs (roleplay, real), llama.cpp server with SmolLM2-135M, max_new_tokens=128")
        print(
            "| concurrency | ours merges/s | bare merges/s | raw ours/bare | ours busy | bare busy | busy ours/bare |"
        )
        print("|---|---|---|---|---|---|---|")
        sequential_busy, ours_busy = 0.0, []
        for concurrency in CONCURRENCY:
            proxy.arrivals = []
            ours_s, ours_u, _ = measured(proxy, lambda c=concurrency: ours(pairs, proxy.url, c, config))
            payloads = list(proxy.arrivals)
            bare_s, bare_u, _ = measured(proxy, lambda c=concurrency, p=payloads: asyncio.run(bare(proxy.url, p, c)))
            if concurrency == 1:
                _, sequential_busy, _ = measured(proxy, lambda p=payloads: asyncio.run(bare(proxy.url, p, 1)))
            ours_busy.append(ours_u)
            print(
                f"| {concurrency} | {len(pairs) / ours_s:.3f} | {len(pairs) / bare_s:.3f} | {bare_s / ours_s:.3f} "
                f"| {ours_u:.3f} | {bare_u:.3f} | {ours_u / bare_u:.3f} |"
            )
        print(
            f"RATIO server utilisation, ours (best concurrency) / one request at a time: "
            f"{max(ours_busy) / sequential_busy:.3f}"
        )
        print(f"({len(payloads)} requests per run: a merge and three quality scores per pair, plus parse retries)")
    finally:
        proxy.stop()
        server.stop()


if __name__ == "__main__":
    main()
