"""What the backends of a probed server spoken to through this project's own HTTP client share."""

from __future__ import annotations

from mergeit_hf.endpoints.base import AttemptObserver
from mergeit_hf.endpoints.http.client import JsonHttpClient
from mergeit_hf.endpoints.probe import ServerInfo
from mergeit_hf.endpoints.servers.queue_watch import QueueWatch


class ServedBackend:
    """A server at ``url``, probed (``server``) before the first request, over ``http``."""

    def __init__(self, url: str, server: ServerInfo, http: JsonHttpClient) -> None:
        self.url = url
        self.model_id = server.model
        self.default_concurrency = server.concurrency
        self.concurrency_announced = server.announced
        self._queue_metrics = server.queue_metrics
        self._http = http
        self._watch: QueueWatch | None = None

    def observe(self, load: AttemptObserver) -> None:
        """Report every attempt to the endpoint's limit, and (a server that counts its queue) what the
        server says it holds and generates: an adaptive limit moves by it, and any request outlives its
        timeout while the server generates."""
        self._http.observe(load)
        # One watcher per limit: a scorer or judge on the same server shares it (and its readings).
        if self._queue_metrics and not getattr(load, "watched", True):
            load.watched = True  # type: ignore[attr-defined]
            self._watch = QueueWatch(self.url, self._http.headers, load)
            self._watch.start()

    async def size_pool(self, connections: int) -> None:
        await self._http.size_pool(connections)

    async def aclose(self) -> None:
        if self._watch is not None:
            await self._watch.aclose()
            self._watch = None
        await self._http.aclose()
