"""A scripted OpenAI-compatible server with N slots and a fixed latency, in a process of its own.

For bench/merge.py: its answers cost the client nothing to make, so what is measured is the client's
scheduling against a server like TGI (``max_concurrent_requests`` slots, requests beyond them queued).
Merges restate every source; scores put 0.9 on "4"; the judge says yes at 0.9. Prints the URL, then serves until killed.
Run: python _slot_server.py SLOTS LATENCY_S
"""

from __future__ import annotations

import re
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.helpers.scripted import ScriptedServer, peaked

_SOURCE = re.compile(r"## Example [A-E]\nInstruction: (.*?)\n(?:Input: (.*?)\n)?Output: (.*?)(?=\n\n## |\Z)", re.DOTALL)


def merge(prompt: str, body: dict) -> dict[str, str]:
    sources = _SOURCE.findall(prompt)
    return {
        "instruction": "\nThen: ".join(s[0] for s in sources),
        "input": "\n".join(s[1] for s in sources if s[1]),
        "output": "\n\n".join(s[2].strip() for s in sources),
    }


def score(instruction: str, output: str) -> dict[str, float]:
    return peaked(4)


if __name__ == "__main__":
    slots, latency = int(sys.argv[1]), float(sys.argv[2])
    server = ScriptedServer(
        merge, score, model_id="scripted/slots", slots=slots, latency_s=latency, judge=lambda prompt: 0.9
    ).start()
    print(server.url, flush=True)
    threading.Event().wait()
