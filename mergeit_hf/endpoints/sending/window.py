"""Many requests' worth of work, a window of it in flight at once.

Starting a coroutine per row for a million rows at once holds a million tasks (and their prompts) in memory
while the scheduler lets a few dozen through. Here at most ``window`` run; each one that ends lets the next
start, so the server's slots stay busy without the backlog.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

T = TypeVar("T")
_RECHECK_S = 0.05
Item = TypeVar("Item")


async def map_windowed(
    work: Callable[[Item], Awaitable[T]], items: Iterable[Item], window: int | Callable[[], int]
) -> list[T]:
    """``[await work(item) for item in items]`` with up to ``window`` running at once (a number, or read
    again before each start: it follows an endpoint's limit as that moves); results in input order. An
    exception stops feeding, cancels what still runs and is raised."""
    size = window if callable(window) else lambda: window
    # A window that follows a limit is read again while full, not only when a task ends: a limit that
    # doubles in slow start would otherwise wait for a whole pair (several requests in a row) to be used.
    recheck_s = _RECHECK_S if callable(window) else None
    results: dict[int, T] = {}
    running: dict[asyncio.Future, int] = {}
    try:
        for index, item in enumerate(items):
            while len(running) >= size():
                await _settle(running, results, recheck_s)
            running[asyncio.ensure_future(work(item))] = index
        while running:
            await _settle(running, results)
    except BaseException:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        raise
    return [results[i] for i in range(len(results))]


async def _settle(running: dict[asyncio.Future, int], results: dict[int, T], timeout_s: float | None = None) -> None:
    done, _ = await asyncio.wait(running, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    for task in done:
        results[running.pop(task)] = task.result()
