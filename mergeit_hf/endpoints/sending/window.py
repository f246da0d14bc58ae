"""Many requests' worth of work, a window of it in flight at once.

Starting a coroutine per row for a million rows at once holds a million tasks (and their prompts) in memory
while the scheduler lets a few dozen through. Here at most ``window`` run; each one that ends lets the next
start, so the server's slots stay busy without the backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

T = TypeVar("T")
Item = TypeVar("Item")
_RECHECK_S = 0.05


async def map_windowed(
    work: Callable[[Item], Awaitable[T]], items: Iterable[Item], window: int | Callable[[], int]
) -> list[T]:
    """``[await work(item) for item in items]`` with up to ``window`` running at once (a number, or read
    again before each start: it follows an endpoint's limit as that moves); results in input order. An
    exception stops feeding, cancels what still runs and is raised."""
    size = window if callable(window) else lambda: window
    # A window that follows a limit is read again every ``_RECHECK_S`` while full, not only when a task
    # ends: a limit doubling in slow start would otherwise wait for a whole pair (several requests in a row).
    recheck_s = _RECHECK_S if callable(window) else None
    results: dict[int, T] = {}
    running: dict[asyncio.Future, int] = {}
    finished: list[asyncio.Future] = []
    ended = asyncio.Event()  # set by each task's end: one wait, however many tasks run

    def on_end(task: asyncio.Future) -> None:
        finished.append(task)
        ended.set()

    try:
        for index, item in enumerate(items):
            while len(running) >= size():
                await _settle(running, results, finished, ended, recheck_s)
            task = asyncio.ensure_future(work(item))
            running[task] = index
            task.add_done_callback(on_end)
        while running:
            await _settle(running, results, finished, ended, None)
    except BaseException:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        raise
    return [results[i] for i in range(len(results))]


async def _settle(
    running: dict[asyncio.Future, int],
    results: dict[int, T],
    finished: list[asyncio.Future],
    ended: asyncio.Event,
    timeout_s: float | None,
) -> None:
    """Collect the tasks that ended (raising the first error), after waiting for one if none has."""
    if not finished:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(ended.wait(), timeout_s)
    ended.clear()
    done, finished[:] = list(finished), []
    for task in done:
        results[running.pop(task)] = task.result()
