"""``pairs.map(Merger(...))`` as a script runs it: 500 real pairs against a scripted 32-slot server in its own
process (0.5 s an answer), batched (datasets' default batch of 1000), batch_size 8, unbatched, and unbatched
through ``merger.amerge``; beside the CLI's stage 2 (``merge_stage``, the stream ``mergeit run`` uses) on
the same pairs. Requests and probes as the server counted them, and seconds. Retention off (the server's
answers restate their sources; what is measured is the scheduling). Each variant a fresh request cache.
Run: cd bench && ../.venv/bin/python map_session.py > map_session.out.md
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mergeit_hf import MergeItConfig
from mergeit_hf.engines.datasets_engine import merge_stage
from mergeit_hf.stage2.merge.merger import Merger
from tests.helpers.pairs import pairs_dataset, real_rows
from tests.helpers.slot_process import slot_server_process

N_PAIRS, SLOTS, LATENCY_S = 500, 32, 0.5
SERIAL_PAIRS = 40
CONFIG = MergeItConfig(compute_retention=False, min_retention=0.0, scorer_check_rows=0)


def main() -> None:
    rows = real_rows("gpteacher_roleplay.json", list(range(2 * N_PAIRS)))
    pairs = pairs_dataset(*zip(rows[::2], rows[1::2], strict=True))
    variants = {
        "map, batched (batch_size 1000)": lambda m: pairs.map(m, batched=True),
        "map, batch_size 8": lambda m: pairs.map(m, batched=True, batch_size=8),
        # One pair after the other: on the first 40 pairs only (the whole 500 would take a quarter of an hour).
        f"map, unbatched (merger), first {SERIAL_PAIRS} pairs": lambda m: pairs.select(range(SERIAL_PAIRS)).map(m),
        "map, unbatched (merger.amerge)": lambda m: pairs.map(m.amerge),
        "merge_stage (the CLI's stream)": lambda m: merge_stage(pairs, m)[0],
    }
    print(f"# {N_PAIRS} pairs, a scripted {SLOTS}-slot server (0.5 s an answer, its own process)\n")
    print("| how | requests | probes | seconds | statuses |\n|---|---|---|---|---|")
    with slot_server_process(SLOTS, LATENCY_S) as url:
        for name, run in variants.items():
            httpx.get(f"{url}/stats", params={"reset": "1"}, timeout=10)
            with tempfile.TemporaryDirectory() as cache:
                merger = Merger(endpoint=url, config=CONFIG, cache_dir=cache)
                started = time.perf_counter()
                merged = run(merger)
                seconds = time.perf_counter() - started
            stats = httpx.get(f"{url}/stats", timeout=10).json()
            statuses = dict(sorted({s: merged["merge_status"].count(s) for s in set(merged["merge_status"])}.items()))
            print(f"| {name} | {stats['requests']} | {stats['probes']} | {seconds:.1f} | {statuses} |", flush=True)


if __name__ == "__main__":
    main()
