"""How many requests one endpoint gets at once, found while sending when the server does not say.

One ``EndpointLoad`` per endpoint per session, shared by every role that sends to it (merges, scores, the
judge, the scorer check, complexity, the prefilter), so an endpoint serving all of them gets one limit,
not one per role.

A fixed limit (``concurrency`` in the config, or a size the server announces: TGI's
``max_concurrent_requests``, SGLang's ``max_running_requests``, llama.cpp's ``total_slots``) is kept as
it is. Otherwise the limit starts modest and moves the way TCP's congestion control and Netflix's
``concurrency-limits`` (Gradient2) find a server's capacity:

- each role's recent latency (a fast-moving average) is compared with its long-run latency (a slow one), as
  Gradient2 does: a merge and a score differ a hundredfold, and merges of different lengths differ too, so
  only a change against the role's own history is a sign. While answers come back about as fast as they
  used to (gradient ≥ 0.9) and the limit is in use, it doubles every round (slow start) until the first
  sign of load, then grows by a tenth a round;
- when latency rises (queueing: gradient < 0.75) it shrinks in proportion;
- a 429 or 503 or a timeout cuts it by a quarter, at most once a round (the round that was cut does not
  grow), and growth past that level is additive only; a 429 that says the rate window is spent
  (``x-ratelimit-remaining-requests: 0``, as OpenAI's do) cuts it by a tenth only: a rate limit is a ceiling
  the limit just crossed, not a queue of unknown depth. An answer that says the window is spent holds the
  limit where it is for the round: that is the limit the window allows. Nor does the limit grow by more than
  the answers of the round said the window has left (``x-ratelimit-remaining-requests``): slow start ends at
  the window, not at a wall of 429s.

A round is as many answers as the limit: the server has had time to show the effect of the last change.
A server that counts its own queue (vLLM's ``/metrics``) is read while sending: nothing waiting there while
the limit is full doubles it at once during slow start (a round of answers takes a whole request's time);
requests waiting there (in two readings running) end slow start, bring the limit down to this client's
share of what the server runs and stop growth until they are gone. Recent readings stand in for the
latency gradient (throttles and timeouts still cut); without them for two seconds, latency leads again.

When more requests wait than the limit admits, the most urgent goes first (``request_priority``): what
finishes a pair already merged (its score, the judge) before new merges, and merges before the sources'
scores, which nothing waits on until a merge is back. Measured at 128 slots, sources scored first left the
last second of stage 2 to a dwindling chain of merges and their scores.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

#: Where an unannounced endpoint starts: modest for a one-slot server, doubled quickly for a large one.
START_LIMIT = 8
#: Never more in flight than this at one endpoint, whatever the latency says.
MAX_LIMIT = 1024
_GROW = 0.9  # gradient at or above which the server keeps up
_SHRINK = 0.75  # gradient below which requests queue
_CUT = 0.75  # the limit after a throttle, as a share of what it was
# The limit after a 429 that says the rate window is spent: the limit went just past what the window
# sustains (a rate is a ceiling, not a queue that fills), so a quarter off would leave most of that quarter
# of the window unused until the limit grew back.
_RATE_CUT = 0.9
_RECENT = 0.3  # weight of a new answer in a role's recent latency
_LONG_RUN_ROUNDS = 8  # a role's long-run latency follows a change over about this many rounds
_SENDERS_EVERY_S = 1.0
_QUEUE_READING_S = 2.0  # a queue reading older than this is stale: latency leads again

#: The role of the request being sent (set by the scheduler), for latency baselines and counts by role.
request_role: ContextVar[str] = ContextVar("request_role", default="request")
#: How soon a waiting request is admitted: lower first (``FINISHING`` before ``NEW_WORK`` before ``LEAF``).
FINISHING, NEW_WORK, LEAF = 0, 1, 2
request_priority: ContextVar[int] = ContextVar("request_priority", default=NEW_WORK)


@dataclass
class EndpointLoad:
    """The limit on requests in flight to one endpoint, and what was sent to it, by role."""

    name: str  # how the card names the endpoint (its kind and model; never the URL)
    limit: float = START_LIMIT
    fixed: bool = False
    in_flight: int = 0
    peak_limit: float = 0.0  # the highest limit reached
    sent: Counter = field(default_factory=Counter)  # attempts that reached the server, by role
    retried: Counter = field(default_factory=Counter)  # attempts after a request's first, by role
    throttled: int = 0  # answers 429 or 503 (the server said: too many)
    timeouts: int = 0  # attempts with no answer (a timeout or a dropped connection)
    _recent: dict[str, float] = field(default_factory=dict)  # role → recent latency (fast-moving average)
    _long_run: dict[str, float] = field(default_factory=dict)  # role → long-run latency (slow-moving average)
    _gradient: float = 1.0
    _slow_start: bool = True
    _answers_this_round: int = 0
    _cut_at: float | None = None  # the limit at the last throttle: growth past it is additive
    _cut_this_round: bool = False
    _busy_at_peak: bool = False  # the limit was reached during this round (so it is what binds)
    _server_full: bool = False  # the server's last reading had requests waiting for room
    # The fewest requests an answer this round said the rate window has left (``x-ratelimit-remaining-
    # requests``); None while no answer said. 0: the window is spent.
    _window_room: int | None = None
    _queue_read_at: float = float("-inf")  # when the server last counted its queue (``server_queue``)
    watched: bool = False  # a watcher reads the server's queue for this limit (one per endpoint)
    # When the server last said it had generated more tokens (vLLM's counter, read by the watcher), on
    # ``time.monotonic``; None while it has not said. A request outlives its timeout while this moves.
    progressed_at: float | None = None
    kept_past_timeout: int = 0  # requests answered past request_timeout_s, kept as the server was generating
    _generated: float | None = None
    # How many processes of this machine send here now (``senders.Senders.count``): a fixed limit is split
    # among them. Read again at most once a second, as workers start and end.
    count_senders: Callable[[], int] | None = None
    sharing: int = 1
    peak_sharing: int = 1
    _senders_read_at: float = float("-inf")
    # (priority, arrival, place): a heap; a place cancelled while waiting stays until it is reached
    _waiters: list[tuple[int, int, asyncio.Future]] = field(default_factory=list)
    _arrivals: itertools.count = field(default_factory=itertools.count)
    _queued: int = 0  # waiters not yet woken nor cancelled
    _stopped: BaseException | None = None

    def __post_init__(self) -> None:
        self.peak_limit = self.limit

    @property
    def current(self) -> int:
        if self.fixed:
            return max(1, int(self.limit) // self.sharing)
        return max(1, int(self.limit))

    def _read_senders(self) -> None:
        now = time.monotonic()
        if self.count_senders is None or now - self._senders_read_at < _SENDERS_EVERY_S:
            return
        self._senders_read_at = now
        self.sharing = self.count_senders()
        self.peak_sharing = max(self.peak_sharing, self.sharing)

    @property
    def exploring(self) -> bool:
        """Still in slow start: the server's capacity is not found yet."""
        return self._slow_start and not self.fixed

    def stop(self, error: BaseException) -> None:
        """Admit nothing more: every request waiting or to come raises ``error`` (a refused key, model or
        parameter: every request would get the same answer)."""
        self._stopped = error
        for _, _, waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(error)
        self._waiters.clear()
        self._queued = 0

    @asynccontextmanager
    async def slot(self, priority: int = NEW_WORK) -> AsyncIterator[None]:
        """Hold one of the limit's places for the block (a request and its retries); while none is free,
        wait behind every request of a lower ``priority`` and the earlier ones of the same.

        A freed place is handed to the waiter it wakes (counted in flight at once), and a newcomer queues
        while anyone waits, so no request that arrives later takes the place of one woken earlier."""
        if self._stopped is not None:
            raise self._stopped
        self._read_senders()
        if self.in_flight >= self.current or self._queued:
            await self._wait_for_place(priority)
        else:
            self.in_flight += 1
        self._busy_at_peak |= self.in_flight >= self.current
        try:
            yield
        finally:
            self.in_flight -= 1
            self._wake()

    async def _wait_for_place(self, priority: int) -> None:
        waiter = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (priority, next(self._arrivals), waiter))
        self._queued += 1
        try:
            await waiter
        except BaseException:
            if waiter.cancelled():
                self._queued -= 1  # cancelled while it waited: ``_wake`` skips it
            elif waiter.exception() is None:
                self.in_flight -= 1  # given a place, then cancelled before using it: the next waiter's
                self._wake()
            raise
        if self._stopped is not None:  # stopped after this one was woken
            self.in_flight -= 1
            raise self._stopped

    def _wake(self) -> None:
        while self.in_flight < self.current and self._waiters:
            _, _, waiter = heapq.heappop(self._waiters)
            if not waiter.done():  # skipped: one cancelled while it waited
                self._queued -= 1
                self.in_flight += 1
                waiter.set_result(None)

    # -- what the transport reports of each attempt ---------------------------------------------------------

    def attempt(self, first: bool) -> None:
        role = request_role.get()
        self.sent[role] += 1
        if not first:
            self.retried[role] += 1

    def answered(self, status: int | None, latency_s: float, headers: Mapping[str, str] | None = None) -> None:
        """One attempt's outcome: its HTTP status (None: no answer, a timeout or dropped connection)."""
        self._read_senders()  # (also while long requests run and no new one asks for a place)
        if status in (429, 503):
            self.throttled += 1
            self._throttle(_RATE_CUT if status == 429 and _window_spent(headers) else _CUT)
            self._count_answer()  # refusals end rounds too, so a wall of them is cut again each round
        elif status is None:
            self.timeouts += 1
            self._throttle(_CUT)
            self._count_answer()
        elif 200 <= status < 300:
            room = _window_room(headers)
            if room is not None:
                self._window_room = room if self._window_room is None else min(self._window_room, room)
            if room == 0:
                # The rate window is exactly spent: the limit is where it should be. Hold it (no growth this
                # round, no more slow start); a 429 would cut it, as a refusal says it went too far.
                self._slow_start = False
            self._observe(request_role.get(), latency_s)

    def server_queue(self, running: float, waiting: float, generated_tokens: float | None = None) -> None:
        """What the server says it holds now: requests ``running`` and ``waiting`` for room (all clients'),
        and how many tokens it has generated since it started (None: it does not say)."""
        self._read_progress(generated_tokens)
        if self.fixed or running <= 0:
            return  # (a server that runs nothing yet is starting: its queue says nothing of its size)
        full_before, self._server_full = self._server_full, waiting > 0
        self._queue_read_at = time.monotonic()
        if self._server_full and full_before:
            # Full in two readings running (vLLM holds new arrivals as waiting until its next step): this
            # client's share of what runs is its place, as its requests are spread over running and waiting.
            self._slow_start = False
            share = self.in_flight * running / (running + waiting)
            self.limit = max(1.0, min(self.limit, share))
        # (a reading that has not seen every request sent yet says nothing of the room left)
        elif not self._server_full and self._slow_start and self.current <= self.in_flight <= running:
            self.limit = min(MAX_LIMIT, self._within_window(self.limit * 2))
            self.peak_limit = max(self.peak_limit, self.limit)
            self._wake()

    def _read_progress(self, generated_tokens: float | None) -> None:
        if generated_tokens is None:
            return
        if self._generated is not None and generated_tokens > self._generated:
            self.progressed_at = time.monotonic()
        self._generated = generated_tokens

    def count_kept_past_timeout(self) -> None:
        """A request was answered past request_timeout_s, kept as the server was generating all the while."""
        self.kept_past_timeout += 1

    @property
    def _queue_read(self) -> bool:
        """A reading of the server's queue is recent: it stands in for the latency gradient."""
        return time.monotonic() - self._queue_read_at < _QUEUE_READING_S

    def _observe(self, role: str, latency_s: float) -> None:
        latency_s = max(latency_s, 1e-4)
        recent = self._recent.get(role, latency_s)
        long_run = self._long_run.get(role, latency_s)
        self._recent[role] = recent = (1 - _RECENT) * recent + _RECENT * latency_s
        # Slow against a round (as many answers as the limit), so a round's change shows against it.
        weight = 1 / (_LONG_RUN_ROUNDS * self.current)
        self._long_run[role] = long_run = (1 - weight) * long_run + weight * latency_s
        self._gradient = min(1.0, long_run / recent)
        self._count_answer()

    def _count_answer(self) -> None:
        self._answers_this_round += 1
        if self._answers_this_round >= self.current:
            self._end_round()

    def _end_round(self) -> None:
        if not self.fixed:
            # A server that counts its queue says directly what latency only hints at (and latency rises
            # with a GPU server's batch while its throughput grows): its readings replace the gradient.
            keeps_up = not self._server_full if self._queue_read else self._gradient >= _GROW
            if not self._queue_read and self._gradient < _SHRINK:
                self._slow_start = False
                self.limit = max(1.0, self.limit * max(0.5, self._gradient / _GROW))
            # (no growth in a round that was cut: it would undo the cut before the server showed its effect)
            elif keeps_up and self._busy_at_peak and self._window_room != 0 and not self._cut_this_round:
                self.limit = min(MAX_LIMIT, self._grown())
            self.peak_limit = max(self.peak_limit, self.limit)
            self._wake()
        self._answers_this_round = 0
        self._cut_this_round = False
        self._window_room = None
        self._busy_at_peak = self.in_flight >= self.current

    def _grown(self) -> float:
        if self._cut_at is not None and self.limit >= self._cut_at:
            grown = self.limit + 1  # where the server said no before: carefully
        else:
            grown = self.limit * 2 if self._slow_start else self.limit + max(1.0, self.limit * 0.1)
            grown = min(grown, self._cut_at) if self._cut_at is not None else grown
        return self._within_window(grown)

    def _within_window(self, grown: float) -> float:
        """No more growth than the rate window says is left: past it, the added requests are answered 429.
        (While the limit is below what the window sustains, limit + room is at least that: the cap binds
        only near it, so slow start ends there, before the first refusal instead of after a wall of them.)"""
        if self._window_room is None or grown <= self.limit + self._window_room:
            return grown
        self._slow_start = False
        return self.limit + self._window_room

    def _throttle(self, cut: float) -> None:
        if self.fixed or self._cut_this_round:
            return  # one cut per round: a burst of refusals is one signal
        self._slow_start = False
        self._cut_at = self.limit
        self.limit = max(1.0, self.limit * cut)
        self._cut_this_round = True

    # -- the record -----------------------------------------------------------------------------------------

    def describe(self) -> dict[str, str]:
        """For the card and run.json: how the limit was set and what it reached, and what was sent."""
        how = "fixed" if self.fixed else "adaptive"
        shared = f", shared by up to {self.peak_sharing} processes" if self.fixed and self.peak_sharing > 1 else ""
        counts = counts_described(
            self.sent, sum(self.retried.values()), self.throttled, self.timeouts, self.kept_past_timeout
        )
        return {"concurrency": f"{how}, {int(self.peak_limit)} at most{shared}", **counts}


def _window_room(headers: Mapping[str, str] | None) -> int | None:
    """How many requests the server's rate window has left, as the answer says (OpenAI's header); None if
    it does not say (or says something that is not a count)."""
    value = (headers or {}).get("x-ratelimit-remaining-requests", "")
    return int(value) if value.isascii() and value.isdigit() else None


def _window_spent(headers: Mapping[str, str] | None) -> bool:
    """The answer says the server's rate window has no request left."""
    return _window_room(headers) == 0


def counts_described(sent: Counter, retried: int, throttled: int, unanswered: int, kept: int = 0) -> dict[str, str]:
    """What was sent, in the words of the card and run.json (one endpoint's counts, or a sum of them)."""
    by_role = ", ".join(f"{role} {n}" for role, n in sorted(sent.items()))
    counts = {
        "requests": f"{sum(sent.values())} ({by_role})" if by_role else "0",
        "retried": str(retried),
        "throttled (429/503)": str(throttled),
        "unanswered (timeout or dropped)": str(unanswered),
    }
    if kept:
        counts["kept past request_timeout_s (the server was generating)"] = str(kept)
    return counts
