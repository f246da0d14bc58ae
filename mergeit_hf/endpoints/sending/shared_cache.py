"""The request cache for many writers on many nodes: one append-only file per writer, safe on NFS.

SQLite's WAL needs shared memory between its processes, so it works only on one machine, and its locks are
unreliable over a network filesystem (sqlite.org/wal.html, sqlite.org/faq.html#q5); a Ray job whose actors
on several nodes shared one ``requests.sqlite3`` on NFS could corrupt it. Here nothing is locked and nothing
rewritten: each writer (a merge actor, the driver) appends to ``requests.<host>-<pid>-<random>.jsonl``,
one answer a line, each written whole on an ``O_APPEND`` descriptor. On opening, every such file in the
folder is indexed (hash → file and offset), so a job started again finds every answer its killed run
received; a line cut short by a killed writer, the only damage a crash can do, is skipped and counted.
Answers other writers receive after this one opened are not seen: each pair is merged in one actor, which
has its own answers. The datasets engine's ``requests.sqlite3`` is not read.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
from pathlib import Path
from typing import Any

from mergeit_hf.endpoints.sending.request_cache import RequestCache

SHARD_GLOB = "requests.*.jsonl"


class SharedRequestCache(RequestCache):
    """Completed responses by payload hash, in per-writer append-only files; a ``None`` folder disables it."""

    def __init__(self, folder: str | Path | None) -> None:
        self.folder = Path(folder) if folder is not None else None
        self._lock = threading.Lock()
        self._index: dict[str, tuple[Path, int]] = {}
        self.torn_lines = 0  # lines a killed writer left unfinished, skipped
        self._descriptor: int | None = None  # opened on the first answer: a writer with none leaves no file
        if self.folder is not None:
            self._own = self.folder / f"requests.{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}.jsonl"
            self.folder.mkdir(parents=True, exist_ok=True)
            for shard in sorted(self.folder.glob(SHARD_GLOB)):
                self._index_shard(shard)

    def _index_shard(self, shard: Path) -> None:
        offset = 0
        with shard.open("rb") as lines:
            for line in lines:
                key = _key_of(line)
                if key is None:
                    self.torn_lines += 1
                else:
                    self._index[key] = (shard, offset)
                offset += len(line)

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            where = self._index.get(key)
        if where is None:
            return None
        shard, offset = where
        with shard.open("rb") as lines:
            lines.seek(offset)
            return json.loads(lines.readline())["response"]

    def put(self, key: str, payload: dict[str, Any], response: dict[str, Any]) -> None:
        if self.folder is None:
            return
        line = json.dumps({"key": key, "payload": payload, "response": response}, sort_keys=True) + "\n"
        data = line.encode("utf-8")
        with self._lock:
            if self._descriptor is None:
                self._descriptor = os.open(self._own, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            offset = os.lseek(self._descriptor, 0, os.SEEK_END)
            while data:  # a short write (a full disk, a signal) leaves the rest to write, not to lose
                data = data[os.write(self._descriptor, data) :]
            self._index[key] = (self._own, offset)

    def close(self) -> None:
        with self._lock:
            if self._descriptor is not None:
                os.close(self._descriptor)
                self._descriptor = None


def _key_of(line: bytes) -> str | None:
    """The hash a complete line stores; None for a line a killed writer cut short."""
    if not line.endswith(b"\n"):
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    key = record.get("key") if isinstance(record, dict) else None
    return key if isinstance(key, str) and "response" in record else None
