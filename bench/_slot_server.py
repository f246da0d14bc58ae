"""The scripted N-slot server of tests/helpers/slot_process.py, for the bench scripts (its own process).
Run: python _slot_server.py SLOTS LATENCY_S (prints the URL, then serves until killed)
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    runpy.run_module("tests.helpers.slot_process", run_name="__main__")
