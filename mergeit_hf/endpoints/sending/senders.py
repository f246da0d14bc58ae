"""The processes of this machine sending to one endpoint at once: ``Dataset.map(num_proc=N)`` workers, or
two runs side by side. Each would otherwise take the whole of a fixed limit (TGI's
``max_concurrent_requests``, a ``concurrency`` in the config), N times what the server takes.

Every session registers in a small SQLite file next to the request cache (so only sessions sharing a cache
folder see each other) and marks itself seen while it sends; the fixed limit is split by how many were seen
in the last ``RECENT_S`` on this host with their process alive (``EndpointLoad.sharing``). A worker done with
its shard stops being seen, and the others take its share. Adaptive limits are not split: each learns from
its own answers (and from vLLM's queue counts, by its share of them).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
import time
import uuid
from pathlib import Path

RECENT_S = 10.0  # a sender not seen sending for this long no longer takes a share
_SCHEMA = """CREATE TABLE IF NOT EXISTS senders (
    session TEXT PRIMARY KEY, endpoint TEXT NOT NULL, host TEXT NOT NULL, pid INTEGER NOT NULL, seen REAL NOT NULL
)"""


class Senders:
    """This session's place among the senders to ``endpoint``, until ``aclose``."""

    def __init__(self, folder: Path, endpoint: str) -> None:
        self._endpoint = endpoint
        self._session = uuid.uuid4().hex
        self._host = socket.gethostname()
        self._connection: sqlite3.Connection | None = sqlite3.connect(
            folder / "senders.sqlite3", timeout=5, isolation_level=None, check_same_thread=False
        )
        self._connection.execute(_SCHEMA)
        self._last = 1
        self.count()

    def count(self) -> int:
        """How many sessions of this host sent to the endpoint lately (this one included, marked seen now).
        A locked or unreadable file keeps the last count: sharing is advisory, never a failed request."""
        if self._connection is None:
            return 1
        with contextlib.suppress(sqlite3.Error):
            self._last = self._count(self._connection)
        return self._last

    def _count(self, connection: sqlite3.Connection) -> int:
        now = time.time()
        connection.execute(
            "INSERT OR REPLACE INTO senders VALUES (?, ?, ?, ?, ?)",
            (self._session, self._endpoint, self._host, os.getpid(), now),
        )
        rows = connection.execute(
            "SELECT session, pid FROM senders WHERE endpoint = ? AND host = ? AND seen > ?",
            (self._endpoint, self._host, now - RECENT_S),
        ).fetchall()
        dead = [session for session, pid in rows if not _alive(pid)]
        if dead:
            connection.executemany("DELETE FROM senders WHERE session = ?", [(session,) for session in dead])
        connection.execute("DELETE FROM senders WHERE seen < ?", (now - 3600,))  # long gone
        return max(1, len(rows) - len(dead))

    async def aclose(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(sqlite3.Error):  # else its entry goes stale in RECENT_S
                self._connection.execute("DELETE FROM senders WHERE session = ?", (self._session,))
            self._connection.close()
            self._connection = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True
