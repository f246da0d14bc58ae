"""Both engines on the user's entry point at each row count asked (a million by default):
``mergeit run FILE --dry-run`` with ``--engine datasets`` and ``--engine ray``, side by side in one run.

The file carries its own 384-d embeddings (the synthetic rows of ``scale.py``, as parquet), so stage 1 is
loading, topics, selection and pairs; the dry run then prints the planned requests and sends none. Each run
is a fresh process with an empty datasets cache; Ray starts locally inside it (2 CPUs here) and stops with
it. Memory is sampled from /proc every half second: the driver's resident memory, and the sum over every
other process in its tree (Ray's raylet, object store and workers; pages shared between them are counted
once per process, so the workers' figure is an upper bound).
With ``--full-pairs N``, each engine also makes a full run: stage 2 on the first N pairs against the
scripted 128-slot server of ``tests/helpers/slot_process.py`` (its own process, outside the measured tree), the rest of
the pairs skipped, and the output folder written: the final dataset, the accounting of every row and the
card at full size, which is what the driver assembles after the merges.
Run: cd bench && ../.venv/bin/python ray_scale.py [--rows 300000,1000000] [--full-pairs 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from loading import as_parquet

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the scripted server of the tests
from tests.helpers.slot_process import slot_server_process  # noqa: E402


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if parent == pid:
                found.append(int(entry.name))
    return found


def _tree(pid: int) -> list[int]:
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += _children(current)
    return tree


_KINDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")


def _memory_mib(pid: int) -> dict[str, float]:
    """Resident memory (VmRSS) and its parts: private (RssAnon), file pages mapped (RssFile: datasets'
    memory-mapped Arrow), shared memory (RssShmem: Ray's object store pages the process maps)."""
    found = dict.fromkeys(_KINDS, 0.0)
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            kind = line.split(":", 1)[0]
            if kind in found:
                found[kind] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return found


def _rss_mib(pid: int) -> float:
    return _memory_mib(pid)["VmRSS"]


def run_cli(path: Path, engine: str, options: list[str]) -> dict:
    output = tempfile.mkdtemp(prefix="mergeit-bench-out-")
    cache = tempfile.mkdtemp(prefix="mergeit-bench-datasets-")
    command = [sys.executable, "-m", "mergeit_hf", "run", str(path), "--output", output, *options]
    if "--dry-run" not in options:  # the request cache of a full run, in the same throwaway folder
        command += ["--cache-dir", str(Path(cache) / "requests")]
    env = {**os.environ, "HF_DATASETS_CACHE": cache, "RAY_AUTH_MODE": "disabled"}
    started = time.perf_counter()
    process = subprocess.Popen(
        [*command, "--engine", engine], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    peaks = {"driver": 0.0, "workers": 0.0, "parts": dict.fromkeys(_KINDS, 0.0)}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            tree = _tree(process.pid)
            driver = _memory_mib(process.pid)
            if driver["VmRSS"] > peaks["driver"]:
                peaks["driver"], peaks["parts"] = driver["VmRSS"], driver
            peaks["workers"] = max(peaks["workers"], sum(_rss_mib(p) for p in tree[1:]))
            stop.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = process.communicate()
    seconds = time.perf_counter() - started
    stop.set()
    sampler.join()
    summary = next((line for line in stdout.splitlines() if "topics" in line and "pairs" in line), "")
    record = Path(output) / "mergeit" / "run.json"
    if record.exists():  # a full run: what it wrote
        counts = json.loads(record.read_text())["counts"]
        summary += f"; {counts['final rows']} final rows ({counts['merges accepted']} merges accepted)"
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(output, ignore_errors=True)
    if process.returncode != 0:
        summary = f"exit {process.returncode}: {stderr[-400:]}"
    return {"seconds": seconds, **peaks, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="1000000", help="comma-separated row counts, each measured in turn")
    parser.add_argument("--full-pairs", type=int, help="also a full run, merging this many pairs (scripted server)")
    args = parser.parse_args()
    for rows in (int(n) for n in args.rows.split(",")):
        path = as_parquet(rows)
        measure(path, rows, ["--dry-run"], "--dry-run")
        if args.full_pairs:
            with slot_server_process(128, 0.05) as url:
                shown = f"--endpoint URL --max-pairs {args.full_pairs}"
                measure(path, rows, ["--endpoint", url, "--max-pairs", str(args.full_pairs)], shown)


def measure(path: Path, rows: int, options: list[str], shown: str) -> None:
    print(f"## `mergeit run {path.name} {shown}`, {rows:,} rows with embeddings, {os.cpu_count()} CPUs\n")
    print(
        "| engine | seconds | driver peak RSS (MiB) | of it: private / file-mapped / shared memory (MiB) "
        "| other processes' peak RSS, summed (MiB) | stage 1 |"
    )
    print("|---|---|---|---|---|---|")
    results = {}
    for engine in ("datasets", "ray"):
        results[engine] = result = run_cli(path, engine, options)
        parts = " / ".join(f"{result['parts'][kind]:,.0f}" for kind in _KINDS[1:])
        print(
            f"| {engine} | {result['seconds']:.0f} | {result['driver']:,.0f} | {parts} | {result['workers']:,.0f} "
            f"| {result['summary']} |",
            flush=True,
        )
    ratio = results["ray"]["seconds"] / results["datasets"]["seconds"]
    print(f"\nRATIO seconds ray / datasets: {ratio:.2f}\n")


if __name__ == "__main__":
    main()
