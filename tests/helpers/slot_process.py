"""A scripted OpenAI-compatible server with N slots and a fixed latency, in a process of its own.

Its answers cost the client nothing to make, so what is measured is the client's scheduling against a
server like TGI (``max_concurrent_requests`` slots, requests beyond them queued). In its own process it
takes no CPU time from the client under test, as a real server would not. Merges restate every source;
scores put 0.9 on "4"; the judge says yes at 0.9. ``/stats`` reports requests, the most held at once and
the busy span (first request to last answer).
Run: python -m tests.helpers.slot_process SLOTS LATENCY_S [--no-info] [--rate N] [--vllm-metrics] (prints the
URL, serves until killed). --no-info: a vLLM-shaped server that announces nothing (no /info; the model is
"scripted/slots");
--rate N: an OpenAI-shaped API admitting N requests a second, 429 with x-ratelimit-* headers beyond;
--vllm-metrics: /metrics counts requests running and waiting, as vLLM's does.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.helpers.scripted import ScriptedServer, peaked

_SOURCE = re.compile(r"## Example [A-E]\nInstruction: (.*?)\n(?:Input: (.*?)\n)?Output: (.*?)(?=\n\n## |\Z)", re.DOTALL)
ROOT = Path(__file__).resolve().parents[2]


def merge(prompt: str, body: dict) -> dict[str, str]:
    sources = _SOURCE.findall(prompt)
    return {
        "instruction": "\nThen: ".join(s[0] for s in sources),
        "input": "\n".join(s[1] for s in sources if s[1]),
        "output": "\n\n".join(s[2].strip() for s in sources),
    }


def score(instruction: str, output: str) -> dict[str, float]:
    return peaked(4)


@contextmanager
def slot_server_process(slots: int, latency_s: float, *options: str) -> Iterator[str]:
    """The server in a child process; yields its URL and kills it after."""
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.slot_process", str(slots), str(latency_s), *options],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert server.stdout is not None
        yield server.stdout.readline().strip()
    finally:
        server.kill()
        server.wait()


if __name__ == "__main__":
    n_slots, latency = int(sys.argv[1]), float(sys.argv[2])
    rate = int(sys.argv[sys.argv.index("--rate") + 1]) if "--rate" in sys.argv else 0
    scripted = ScriptedServer(
        merge,
        score,
        model_id="scripted/slots",
        slots=n_slots,
        latency_s=latency,
        judge=lambda prompt: 0.9,
        serves_info="--no-info" not in sys.argv,
        serves_queue_metrics="--vllm-metrics" in sys.argv,
        rate_per_s=rate,
    ).start()
    print(scripted.url, flush=True)
    threading.Event().wait()
