"""Connections to one server spread over small httpx pools.

httpcore's pool scans every connection it holds for each request it places and each response it closes, so
its cost grows with the square of its connections. Measured through ``mergeit run`` (``bench/capacity.py``):
one pool of 128 kept a 128-slot server 0.15 busy where pools of 8 reached 0.71. Our own client holds several
httpx clients (``JsonHttpClient``); huggingface_hub's holds one, given a ``SpreadTransport``. Requests are
dealt to the pools in turn, and each pool may open twice its share (``pool_limits``), so one that drew
long requests does not hold a request the endpoint's limit admitted waiting for a connection.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

POOL_CONNECTIONS = 8  # connections per httpx pool
_PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


def pool_sizes(connections: int) -> list[int]:
    """``connections`` shared among pools of at most ``POOL_CONNECTIONS`` each, as evenly as they go."""
    count = max(1, -(-connections // POOL_CONNECTIONS))
    return [-(-connections // count)] * count


def pool_limits(httpx_module: ModuleType, size: int) -> Any:
    """httpx limits for a pool taking ``size`` of the connections, with as many again to spare."""
    return httpx_module.Limits(max_connections=2 * size, max_keepalive_connections=size)


def proxied() -> bool:
    """A proxy is set in the environment. httpx ignores those variables for a client given its own
    transport, so a client that must honour them keeps httpx's single pool."""
    return any(os.environ.get(name) for name in _PROXY_VARIABLES)


class SpreadTransport:
    """An httpx transport that hands each request to the next of several pools, in turn. Duck-typed as
    httpx's ``AsyncBaseTransport`` (huggingface_hub ships its own copy of httpx, ``httpx2``)."""

    def __init__(self, transports: list[Any]) -> None:
        self._transports = transports
        self._turn = 0

    @classmethod
    def open(cls, httpx_module: ModuleType, connections: int) -> SpreadTransport:
        """Pools of ``httpx_module`` for ``connections`` in all, sharing one TLS context (each pool would
        otherwise build its own, some milliseconds each)."""
        context = httpx_module.create_ssl_context()
        transports = [
            httpx_module.AsyncHTTPTransport(verify=context, limits=pool_limits(httpx_module, size))
            for size in pool_sizes(connections)
        ]
        return cls(transports)

    @property
    def pools(self) -> int:
        return len(self._transports)

    async def handle_async_request(self, request: Any) -> Any:
        self._turn = (self._turn + 1) % len(self._transports)
        return await self._transports[self._turn].handle_async_request(request)

    async def __aenter__(self) -> SpreadTransport:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        for transport in self._transports:
            await transport.aclose()
