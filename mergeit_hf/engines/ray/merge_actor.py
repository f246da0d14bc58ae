"""One merge actor of the Ray engine's pool: a batch of pairs in, their outcomes out, with what the batch sent.

The actor keeps one stage 2 session open across its batches (``ProcessSession``: the backends, the request
cache and the endpoint's limit, which keeps what it learnt). Ray Data calls it with a pyarrow batch of pairs
and takes back a batch of the same rows: each pair's position and its pickled ``MergeOutcome``; the first
row also carries the batch's ``BatchReport`` (what was sent, the models), the others an empty cell. Ray
Data may join several batches' outputs into one block: the driver reads every non-empty report cell.

The keys come in the object store (``travel.actor_keys``), not in the constructor's visible arguments nor
the runtime environment, which Ray's dashboard and state API show.

A run-stopping error (a refused key or model, a scorer without digits) is returned in the report rather than
raised: Ray Data would wrap it in its own exception and lose its type and advice; the driver raises it.
"""

from __future__ import annotations

import pickle
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from mergeit_hf.endpoints.sending.ledger import RequestLedger
from mergeit_hf.endpoints.sending.limit import EndpointLoad
from mergeit_hf.engines.ray.travel import apply_keys
from mergeit_hf.errors import MergeItError
from mergeit_hf.stage2.merge.merger import WINDOW_PER_SLOT, Merger
from mergeit_hf.stage2.merge.process_session import ProcessSession
from mergeit_hf.stage2.merge.results import MergeStats
from mergeit_hf.stage2.merge.session import Session

POSITION = "__mergeit_pair_position"  # the pair's place in the run's pairs: outcomes are put back in order
OUTCOME = "__mergeit_outcome"
REPORT = "__mergeit_report"


@dataclass(frozen=True)
class RoleLoad:
    """One endpoint role's counts in one actor, from its start: the driver adds them up over the actors."""

    ledger: RequestLedger
    peak_limit: int
    fixed: bool

    @classmethod
    def of(cls, load: EndpointLoad) -> RoleLoad:
        ledger = RequestLedger()
        ledger.add(load)
        return cls(ledger, int(load.peak_limit), load.fixed)


@dataclass
class BatchReport:
    """What one batch sent (the part of the actor's counts since its last batch) and the models it used."""

    actor: str = ""  # which actor: a restarted actor is a new one, and the dead one's reports stand
    ledger: RequestLedger = field(default_factory=RequestLedger)
    stats: MergeStats = field(default_factory=MergeStats)
    merge_model: str = ""
    quality_model: str = ""
    endpoints: dict[str, dict[str, str]] = field(default_factory=dict)
    role_loads: dict[str, RoleLoad] = field(default_factory=dict)  # by role, this actor's totals so far
    limit: int = 0  # the merge endpoint's limit in this actor after the batch
    stopped: MergeItError | None = None  # a run-stopping error: the driver raises it


class MergeActor:
    """Ray Data's callable class for ``map_batches``: built once per actor from the driver's ``Merger``."""

    def __init__(self, merger: Merger, keys: list[Any]) -> None:
        import ray

        # A list around the reference: Ray resolves a reference given as an argument itself, a nested one stays
        # a reference, so the keys never sit among the actor's arguments.
        apply_keys(ray.get(keys[0]))
        self.actor = uuid.uuid4().hex
        self.merger = merger
        self.templates = merger.templates()
        self._ledger_reported = RequestLedger()
        self._stats_reported = MergeStats()

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        rows = batch.to_pylist()
        positions = [row.pop(POSITION) for row in rows]
        try:
            outcomes, report = ProcessSession.of(self.merger).run(lambda session: self._merge(session, rows))
        except MergeItError as exc:
            return _columns([-1], [b""], _picklable(exc))
        return _columns(positions, [pickle.dumps(outcome) for outcome in outcomes], report)

    async def _merge(self, session: Session, rows: list[dict[str, Any]]) -> tuple[list, BatchReport]:
        merged = await self.merger.merge_with(session, rows, self.templates, window="auto", total=len(rows))
        # Counted on the session's loop with no await in between: batches running side by side in this actor
        # each take what was sent since the last one reported, and the parts add up to the actor's total.
        assert session.merges is not None
        ledger = RequestLedger()
        for load in session.loads.values():
            ledger.add(load)
        stats = merged.stats
        report = BatchReport(
            self.actor,
            ledger.since(self._ledger_reported),
            MergeStats(
                stats.requests_sent - self._stats_reported.requests_sent,
                stats.idle_releases - self._stats_reported.idle_releases,
            ),
            merged.merge_model,
            merged.quality_model,
            merged.endpoints,
            _role_loads(session),
            session.merges.concurrency,
        )
        self._ledger_reported, self._stats_reported = ledger, stats
        return merged.outcomes, report


def _role_loads(session: Session) -> dict[str, RoleLoad]:
    schedulers = {"merge": session.merges, "scorer": session.scorer.scheduler if session.scorer.raw else None}
    if session.judge is not None:
        schedulers["judge"] = session.judge.scheduler
    return {role: RoleLoad.of(s.load) for role, s in schedulers.items() if s is not None}


def batch_size_for(share: int | None) -> int:
    """Pairs per batch: enough to keep the actor's share of the slots busy (``WINDOW_PER_SLOT`` pairs per
    slot) and small enough that a crashed actor loses little; 64 where the limit adapts."""
    return max(16, WINDOW_PER_SLOT * share) if share else 64


def _columns(positions: list[int], outcomes: list[bytes], report: BatchReport | MergeItError) -> dict[str, np.ndarray]:
    if isinstance(report, MergeItError):
        report = BatchReport(stopped=report)
    reports = [pickle.dumps(report)] + [b""] * (len(positions) - 1)
    return {
        POSITION: np.asarray(positions, dtype=np.int64),
        OUTCOME: np.asarray(outcomes, dtype=object),
        REPORT: np.asarray(reports, dtype=object),
    }


def _picklable(exc: MergeItError) -> MergeItError:
    """The error itself if it survives pickling, else one of its base class with the same words."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:  # an error whose constructor takes other arguments than its message
        return MergeItError(f"{type(exc).__name__}: {exc}")
    return exc
