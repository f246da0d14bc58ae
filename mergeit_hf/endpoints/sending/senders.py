"""The processes of this machine sending to one endpoint at once: ``Dataset.map(num_proc=N)`` workers, or
two runs side by side. Each would otherwise take the whole of a limit the server fixed (TGI's
``max_concurrent_requests``, a ``concurrency`` in the config), N times what the server takes. Every session
registers its process in a small SQLite file next to the request cache; the fixed limit is split by how
many are alive (``EndpointLoad.sharing``). Adaptive limits need no split: each learns from the same latency.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

_SCHEMA = """CREATE TABLE IF NOT EXISTS senders (
    endpoint TEXT NOT NULL, pid INTEGER NOT NULL, PRIMARY KEY (endpoint, pid)
)"""


class Senders:
    """This process's place among the senders to ``endpoint``, until ``aclose``."""

    def __init__(self, folder: Path, endpoint: str) -> None:
        self._endpoint = endpoint
        self._pid = os.getpid()
        self._connection: sqlite3.Connection | None = sqlite3.connect(
            folder / "senders.sqlite3", timeout=30, isolation_level=None, check_same_thread=False
        )
        self._connection.execute(_SCHEMA)
        self._connection.execute("INSERT OR REPLACE INTO senders VALUES (?, ?)", (endpoint, self._pid))

    def count(self) -> int:
        """How many live processes send to the endpoint (this one included); entries of dead ones go."""
        if self._connection is None:
            return 1
        query = "SELECT pid FROM senders WHERE endpoint = ?"
        pids = [pid for (pid,) in self._connection.execute(query, (self._endpoint,))]
        dead = [pid for pid in pids if pid != self._pid and not _alive(pid)]
        if dead:
            self._connection.executemany(
                "DELETE FROM senders WHERE endpoint = ? AND pid = ?", [(self._endpoint, pid) for pid in dead]
            )
        return max(1, len(pids) - len(dead))

    async def aclose(self) -> None:
        if self._connection is not None:
            self._connection.execute("DELETE FROM senders WHERE endpoint = ? AND pid = ?", (self._endpoint, self._pid))
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
