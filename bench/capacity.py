"""Every server kept busy without being told its size: ``mergeit run`` at the default config (stage 1
included, as a user runs it) on 2,500 real Toolformer rows, against scripted servers each in a process of
its own, side by side with a fixed ``concurrency: 8`` (the old default) and a fixed ``concurrency: 128``.

Servers: TGI-shaped (128 slots, /info announces them), vLLM-shaped (128 slots, no size announced; its
/metrics counts requests running and waiting, as vLLM's), a server that says nothing of itself, an
OpenAI-shaped API admitting 50 requests a second (429 with x-ratelimit-* headers beyond), and a one-slot
server (as llama-cpp-python's). Answers take 0.5 s (the API's 1 s). Utilisation is the share of the ideal:
for a slot server, slot-seconds used over slots × busy span; for the API, requests a second over its 50.
Utilisation is stage 2's, from its first merge request (the probe and the scorer check come before it).
The one-slot server answers in 0.05 s (at 0.5 s its runs would take a quarter of an hour each).
Each run starts from an empty request cache; stage 1's embeddings come from datasets' cache after the first.
With ``--engines datasets,ray`` each setting runs through both engines (``--engine ray``: a local Ray, whose
merge actors share the endpoint's limit), side by side.
Run: cd bench && ../.venv/bin/python capacity.py [--rows 2500] [--only vLLM] [--settings default,128]
     [--engines datasets,ray] > capacity.out.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from _common import shared_file

ROOT = Path(__file__).resolve().parent.parent
SERVERS = {
    "TGI-shaped, 128 slots, /info": (128, 0.5, ()),
    "vLLM-shaped, 128 slots, no /info, /metrics": (128, 0.5, ("--no-info", "--vllm-metrics")),
    "128 slots, announcing nothing": (128, 0.5, ("--no-info",)),
    "OpenAI-shaped API, 50 requests/s": (4096, 1.0, ("--no-info", "--rate", "50")),
    "one slot (0.05 s an answer)": (1, 0.05, ("--no-info",)),
}
SETTINGS = {"default (adaptive)": None, "concurrency: 8": 8, "concurrency: 128": 128}


def start(slots: int, latency: float, options: tuple[str, ...]) -> tuple[subprocess.Popen, str]:
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.slot_process", str(slots), str(latency), *options],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert server.stdout is not None
    return server, server.stdout.readline().strip()


def run(data: Path, url: str, concurrency: int | None, no_info: bool, folder: Path, engine: str) -> dict:
    config = folder / "config.yaml"
    config.write_text(
        ("model: scripted/slots\n" if no_info else "") + (f"concurrency: {concurrency}\n" if concurrency else "")
    )
    command = [
        sys.executable,
        "-m",
        "mergeit_hf",
        "run",
        str(data),
        "--output",
        str(folder / "out"),
        "--endpoint",
        url,
        "--cache-dir",
        str(folder / "cache"),
        "--config",
        str(config),
        "--engine",
        engine,
    ]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - started
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1]}
    pairs = json.loads((folder / "out" / "mergeit" / "run.json").read_text())
    return {"seconds": seconds, "record": pairs}


def measure(
    name: str,
    slots: int,
    latency: float,
    options: tuple[str, ...],
    data: Path,
    settings: dict[str, int | None],
    engines: list[str],
) -> list[str]:
    rows = []
    for (setting, concurrency), engine in ((item, engine) for item in settings.items() for engine in engines):
        server, url = start(slots, latency, options)
        try:
            with tempfile.TemporaryDirectory() as folder:
                found = run(data, url, concurrency, "--no-info" in options, Path(folder), engine)
                stats = httpx.get(f"{url}/stats", timeout=30).json()
        finally:
            server.kill()
            server.wait()
        if "error" in found:
            rows.append(f"| {name} | {setting} | {engine} | error: {found['error']} | | | | |")
            continue
        counts, record = found["record"]["counts"], found["record"]
        span = stats["stage2_span_s"] or 1e-9  # stage 2, from its first merge request to the last answer
        if "--rate" in options:  # stage 2's requests a second, over the 50 the API admits
            share = stats["stage2_slot_seconds"] / latency / span / 50
        else:
            share = stats["stage2_slot_seconds"] / min(slots, 128) / span
        sent = stats["requests"] + stats["refused"]
        limit = record["endpoints"].get("merge", {}).get("concurrency", "?")
        rows.append(
            f"| {name} | {setting} | {engine} | {share:.2f} | {stats['refused'] / sent if sent else 0:.1%} | "
            f"{counts.get('merges failed', 0)} of {counts.get('pairs', 0)} | {limit} | {found['seconds']:.0f} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2500)
    parser.add_argument("--only", default="", help="measure only the servers whose name contains this")
    parser.add_argument("--settings", default="", help="comma-separated: only the settings containing one")
    parser.add_argument("--engines", default="datasets", help="comma-separated: datasets, ray")
    args = parser.parse_args()
    rows = json.loads(shared_file("gpteacher_toolformer.json").read_text())[: args.rows]
    wanted = args.settings.split(",")
    settings = {name: value for name, value in SETTINGS.items() if any(part in name for part in wanted)}
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "toolformer.json"
        data.write_text(json.dumps(rows))
        print(
            f"# `mergeit run` on {len(rows)} Toolformer rows, default config; scripted servers in their own processes\n"
        )
        header = (
            "| server | setting | engine | utilisation (share of ideal) | answered 429 | pairs failed | limit "
            "| seconds |"
        )
        print(header)
        print("|---|---|---|---|---|---|---|---|")
        for name, (slots, latency, options) in SERVERS.items():
            if args.only not in name:
                continue
            for line in measure(name, slots, latency, options, data, settings, args.engines.split(",")):
                print(line, flush=True)


if __name__ == "__main__":
    main()
