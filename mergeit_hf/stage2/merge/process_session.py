"""One stage 2 session per process for ``Dataset.map``: opened at a merger's first batch, kept across batches,
closed when the process exits.

``pairs.map(merger, batched=True)`` calls the merger once per batch (and once per row unbatched). Opening
a session each time would probe the endpoints, open the request cache, build the HTTP pool, settle the
structured-output form and the scorer's route, and let the endpoint's limit learn from nothing, again and
again. Here the session lives on an event loop of its own thread, found by the merger's configuration and
the process id (a ``num_proc`` worker, forked, opens its own), so every batch of a ``map`` shares it. The
merger itself stays a plain, picklable dataclass whose fingerprint does not change.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import threading
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any, ClassVar, Protocol, TypeVar

from mergeit_hf.stage2.merge.session import Session

T = TypeVar("T")
_CLOSE_TIMEOUT_S = 30.0


class Opens(Protocol):
    """What a session is opened from: a ``Merger`` (a protocol here, so this module does not import it)."""

    config: Any

    def session(self) -> Any: ...

    def __getstate__(self) -> dict[str, Any]: ...


class ProcessSession:
    """A session held open on a loop thread; ``run`` (sync) and ``arun`` (from another loop) use it."""

    _open: ClassVar[dict[str, ProcessSession]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, merger: Opens) -> None:
        self.merger = merger
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="mergeit-session", daemon=True)
        self._thread.start()
        self._stack = AsyncExitStack()
        self._session: Session | None = None
        self._opening = asyncio.run_coroutine_threadsafe(self._open_session(), self.loop)

    @classmethod
    def of(cls, merger: Opens) -> ProcessSession:
        key = _key(merger)
        with cls._lock:
            found = cls._open.get(key)
            if (
                found is not None
                and found._opening.done()
                and (found._opening.cancelled() or found._opening.exception() is not None)
            ):
                found.close()  # it could not open (a server down, a refused key): the next call tries again
                found = None
            if found is None:
                found = cls._open[key] = cls(merger)
            return found

    async def _open_session(self) -> Session:
        self._session = await self._stack.enter_async_context(self.merger.session())
        return self._session

    async def _with_session(self, work: Callable[[Session], Awaitable[T]]) -> T:
        # Shielded: a caller cancelled while the session opens must not cancel the open every caller shares.
        session = self._session or await asyncio.shield(asyncio.wrap_future(self._opening))
        return await work(session)

    def run(self, work: Callable[[Session], Awaitable[T]]) -> T:
        """``work(session)`` on the session's loop, from synchronous code (a ``map`` call)."""
        return asyncio.run_coroutine_threadsafe(self._with_session(work), self.loop).result()

    async def arun(self, work: Callable[[Session], Awaitable[T]]) -> T:
        """``work(session)`` on the session's loop, awaited from another loop (an async ``map`` function)."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._with_session(work), self.loop))

    def close(self) -> None:
        if not self.loop.is_running():
            return
        try:
            asyncio.run_coroutine_threadsafe(self._stack.aclose(), self.loop).result(_CLOSE_TIMEOUT_S)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(_CLOSE_TIMEOUT_S)

    @classmethod
    def close_all(cls) -> None:
        """Close this process's sessions (backends, then the request cache); called at exit."""
        with cls._lock:
            mine = [s for key, s in cls._open.items() if key.startswith(f"{os.getpid()}:")]
            cls._open = {key: s for key, s in cls._open.items() if not key.startswith(f"{os.getpid()}:")}
        for session in mine:
            # At exit: one session that cannot close must not keep the others open.
            with contextlib.suppress(Exception):
                session.close()


def _key(merger: Opens) -> str:
    state: dict[str, Any] = merger.__getstate__()
    state["config"] = merger.config.to_dict()
    return f"{os.getpid()}:{json.dumps(state, sort_keys=True, default=str)}"


atexit.register(ProcessSession.close_all)
