"""``mergeit run FILE --dry-run`` on a large file that carries its own embeddings: seconds and peak memory.

The user's entry point, as a new user calls it, in a fresh process per run with an empty datasets cache (the
file is converted to Arrow as on a first run): the file is read, validated and accounted for, stage 1 runs on
the given embeddings (paper defaults), and the planned requests are printed; nothing is sent. The same synthetic
rows as ``scale.py`` (300 topics of unit vectors in 384 dimensions), written as parquet and as JSON lines.
Side by side on a smaller file: this loader beside the one before it (the previous commit, checked out in a
temporary worktree), which read every record into Python objects.
Run: cd bench && ../.venv/bin/python loading.py [--rows 1000000] [--compare-rows 100000]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from scale import FOLDER, build

ROOT = Path(__file__).resolve().parent.parent
BEFORE = "47d1b26"  # the last commit whose loader read parquet with to_pylist and JSON lines whole


def as_parquet(n_rows: int) -> Path:
    path = FOLDER / f"synthetic-{n_rows}.parquet"
    if not path.is_file():
        with pa.memory_map(str(build(n_rows))) as source:
            reader = pa.ipc.open_stream(source)
            with pq.ParquetWriter(path, reader.schema) as writer:
                for batch in reader:
                    writer.write_batch(batch)
    return path


def as_json_lines(n_rows: int) -> Path:
    path = FOLDER / f"synthetic-{n_rows}.jsonl"
    if not path.is_file():
        with pa.memory_map(str(build(n_rows))) as source, path.open("w") as out:
            for batch in pa.ipc.open_stream(source):
                for record in batch.to_pylist():
                    out.write(json.dumps(record) + "\n")
    return path


#: The CLI in a fresh process that reports its own peak resident memory as it exits (the dry run is one
#: process: datasets' builders run in it, num_proc unset).
_MEASURED_CLI = (
    "import atexit, resource, sys\n"
    "atexit.register(lambda: print('PEAK_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr))\n"
    "from mergeit_hf.run.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def dry_run(path: Path, code: Path | None = None) -> dict:
    """One ``mergeit run --dry-run`` in a fresh process: wall seconds and that process's peak RSS (MiB)."""
    command = [sys.executable, "-c", _MEASURED_CLI, "run", str(path), "--output", tempfile.mkdtemp(), "--dry-run"]
    # A datasets cache of its own: every run converts its file as a first run does, and leaves nothing behind.
    cache = tempfile.mkdtemp(prefix="mergeit-bench-datasets-")
    env = {"HF_DATASETS_CACHE": cache, **({"PYTHONPATH": str(code)} if code else {})}
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=code or ROOT, env={**_environment(), **env})
    seconds = time.perf_counter() - started
    shutil.rmtree(cache, ignore_errors=True)
    peak = [line for line in done.stderr.splitlines() if line.startswith("PEAK_KIB")]
    outcome = done.stdout.splitlines()[1] if done.returncode == 0 else f"exit {done.returncode}: {done.stderr[-300:]}"
    return {
        "seconds": seconds,
        "peak_mib": int(peak[-1].split()[1]) / 1024 if peak else float("nan"),
        "outcome": outcome,
    }


def _environment() -> dict:
    import os

    return dict(os.environ)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--compare-rows", type=int, default=100_000)
    parser.add_argument("--jsonl-rows", type=int, default=200_000)
    args = parser.parse_args()
    small = as_parquet(args.compare_rows)
    with tempfile.TemporaryDirectory() as folder:
        old = Path(folder) / "before"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), BEFORE], check=True, capture_output=True
        )
        try:
            before = dry_run(small, old)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=True)
    now = dry_run(small)
    print(f"## `mergeit run FILE --dry-run`, {args.compare_rows:,} rows with 384-d embeddings (parquet)\n")
    print("| loader | seconds | peak RSS (MiB) |\n|---|---|---|")
    print(f"| before ({BEFORE}: to_pylist) | {before['seconds']:.1f} | {before['peak_mib']:,.0f} |")
    print(f"| now (datasets' builders, Arrow) | {now['seconds']:.1f} | {now['peak_mib']:,.0f} |")
    print(f"\nRATIO time before / now: {before['seconds'] / now['seconds']:.2f}")
    print(f"RATIO peak memory before / now: {before['peak_mib'] / now['peak_mib']:.2f}")
    print(f"(now: {now['outcome']})\n")
    lines = as_json_lines(args.jsonl_rows)
    streamed = dry_run(lines)
    size = lines.stat().st_size / 2**20
    print(
        f"## {args.jsonl_rows:,} rows, JSON lines ({size:,.0f} MiB file), now: {streamed['seconds']:.0f} s, "
        f"peak RSS {streamed['peak_mib']:,.0f} MiB\n"
    )
    big = dry_run(as_parquet(args.rows))
    print(f"## {args.rows:,} rows, parquet, now: {big['seconds']:.0f} s, peak RSS {big['peak_mib']:,.0f} MiB")
    print(f"({big['outcome']}; budget: 300 s and 4 GiB on 2 cores)")


if __name__ == "__main__":
    main()
