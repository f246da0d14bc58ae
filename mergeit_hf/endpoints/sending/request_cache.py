"""On-disk cache of completed LLM requests, keyed by a hash of the whole payload.

A crashed ``Dataset.map`` keeps nothing (huggingface/datasets#5089); this cache keeps every answer the
moment it arrives, so a run killed half-way and started again re-sends none of the finished requests.
SQLite in WAL mode: each answer is one committed transaction, which survives SIGKILL. ``synchronous=NORMAL``
skips the fsync of each commit (measured: 7% of the client's time in stage 2 against a 128-slot server); in
WAL mode that still survives a killed process, and a power cut loses at most the last answers, not the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    payload_hash TEXT PRIMARY KEY,
    payload TEXT NOT NULL,
    response TEXT NOT NULL,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
)
"""


def default_cache_dir() -> Path:
    """``MERGEIT_CACHE``, else ~/.cache/mergeit-hf/requests."""
    return Path(os.environ.get("MERGEIT_CACHE") or Path.home() / ".cache" / "mergeit-hf" / "requests")


def payload_hash(payload: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of (model id, template hash, messages, generation parameters)."""
    canonical = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class RequestCache:
    """Completed responses by payload hash; a ``None`` folder disables caching."""

    def __init__(self, folder: str | Path | None) -> None:
        self.folder = Path(folder) if folder is not None else None
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._connection = sqlite3.connect(
                self.folder / "requests.sqlite3", timeout=60, check_same_thread=False, isolation_level=None
            )
            self._connection.execute("PRAGMA journal_mode=WAL")
            self._connection.execute("PRAGMA synchronous=NORMAL")
            self._connection.execute(_SCHEMA)

    def get(self, key: str) -> dict[str, Any] | None:
        if self._connection is None:
            return None
        with self._lock:
            row = self._connection.execute("SELECT response FROM responses WHERE payload_hash = ?", (key,)).fetchone()
        if row is None:
            return None
        return json.loads(row[0])

    def put(self, key: str, payload: dict[str, Any], response: dict[str, Any]) -> None:
        if self._connection is None:
            return
        with self._lock:
            self._connection.execute(
                "INSERT OR REPLACE INTO responses (payload_hash, payload, response) VALUES (?, ?, ?)",
                (key, json.dumps(payload, sort_keys=True), json.dumps(response)),
            )

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
