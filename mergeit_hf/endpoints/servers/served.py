"""What the backends of a probed server spoken to through this project's own HTTP client share."""

from __future__ import annotations

from mergeit_hf.endpoints.base import AttemptObserver
from mergeit_hf.endpoints.http.client import JsonHttpClient
from mergeit_hf.endpoints.probe import ServerInfo


class ServedBackend:
    """A server at ``url``, probed (``server``) before the first request, over ``http``."""

    def __init__(self, url: str, server: ServerInfo, http: JsonHttpClient) -> None:
        self.url = url
        self.model_id = server.model
        self.default_concurrency = server.concurrency
        self.concurrency_announced = server.announced
        self._http = http

    def observe(self, load: AttemptObserver) -> None:
        """Report every attempt to the endpoint's limit."""
        self._http.observe(load)

    async def size_pool(self, connections: int) -> None:
        await self._http.size_pool(connections)

    async def aclose(self) -> None:
        await self._http.aclose()
