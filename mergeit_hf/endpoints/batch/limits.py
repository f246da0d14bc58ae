"""The providers' limits on one batch, in one place (OpenAI's Batch API guide: 50,000 requests and 200 MB an
input file; a 24 h completion window; enqueued tokens are per model and tier, so the user states them)."""

from __future__ import annotations

from dataclasses import dataclass

MAX_REQUESTS_PER_FILE = 50_000
MAX_BYTES_PER_FILE = 200 * 1024 * 1024
COMPLETION_WINDOW = "24h"


@dataclass(frozen=True)
class BatchLimits:
    """Where a round's requests are split into several files (each its own batch)."""

    max_requests: int = MAX_REQUESTS_PER_FILE
    max_bytes: int = MAX_BYTES_PER_FILE

    def split(self, lines: list[bytes]) -> list[list[bytes]]:
        """The lines (each one JSON line, newline included) in files within both limits, in order."""
        files: list[list[bytes]] = []
        size = 0
        for line in lines:
            if len(line) > self.max_bytes:
                raise ValueError(f"one batch request is {len(line):,} bytes, above the {self.max_bytes:,} a file holds")
            if not files or len(files[-1]) >= self.max_requests or size + len(line) > self.max_bytes:
                files.append([])
                size = 0
            files[-1].append(line)
            size += len(line)
        return files
