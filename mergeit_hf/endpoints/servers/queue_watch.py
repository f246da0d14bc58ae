"""A server's own count of the requests it runs and queues, read while a session sends to it.

vLLM announces no size, but its ``/metrics`` counts requests running and waiting. Nothing waiting while
this client fills its limit says there is room, sooner than answers' latency can (a round of them takes a
whole request's time); requests waiting say the server is full. ``EndpointLoad.server_queue`` acts on it.
Its count of tokens generated says the server is working: while it rises, no request is cut at its
timeout (``http.client``).
"""

from __future__ import annotations

import asyncio
import contextlib

import httpx

from mergeit_hf.endpoints.base import AttemptObserver
from mergeit_hf.endpoints.probe import read_queue

EVERY_S = 0.25  # between readings once the server's capacity is found (vLLM's /metrics is some 50 kB)
EXPLORING_EVERY_S = 0.05  # while the limit doubles at each reading: from 8 to 128 in a fifth of a second


class QueueWatch:
    """Reads ``url/metrics`` while ``load`` has requests in flight (every ``EXPLORING_EVERY_S`` while the
    limit is in slow start, else every ``EVERY_S``), and tells it. Advisory: a failed reading is skipped
    (the limit falls back on latency when readings stop), and nothing here fails a request or the run."""

    def __init__(self, url: str, headers: dict[str, str], load: AttemptObserver) -> None:
        self._url = url + "/metrics"
        self._headers = headers
        self._load = load
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        async with httpx.AsyncClient(headers=self._headers, timeout=5.0) as http:
            while True:
                await asyncio.sleep(EXPLORING_EVERY_S if getattr(self._load, "exploring", False) else EVERY_S)
                if not getattr(self._load, "in_flight", 1):
                    continue  # idle between batches: nothing to learn
                try:
                    response = await http.get(self._url)
                    queue = read_queue(response.text) if response.status_code == 200 else None
                    if queue is not None:
                        self._load.server_queue(queue.running, queue.waiting, queue.generated_tokens)
                except Exception:  # advisory only: the requests themselves report what matters
                    continue

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
