"""Shared helpers of the benchmark scripts: where the real data is, and a peak-memory reading."""

from __future__ import annotations

import resource
from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def shared_file(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_file():
        raise SystemExit(f"benchmark data not found: {path} (the project expects ../shared/data beside it)")
    return path


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
