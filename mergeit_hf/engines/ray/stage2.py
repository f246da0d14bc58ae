"""Stage 2 on Ray: the pairs stream through a pool of merge actors (``merge_actor``), in batches sized to each
actor's share of the endpoint, while the driver counts the outcomes in behind a progress bar.

Ray Data keeps the pool busy: an actor takes its next batch as one finishes, so the slowest actor no longer
sets the finish. An actor that dies (its process or its node) is restarted and its batch retried (Ray Data's
actor pools set ``max_restarts`` and ``max_task_retries``); the answers that batch had already received sit
in the request cache, so the retry re-sends nothing that was answered. Ray Data ends the pool however the
stage ends (done, an error, Ctrl-C).
"""

from __future__ import annotations

import pickle
from typing import Any

from datasets import Dataset
from tqdm.auto import tqdm

from mergeit_hf.endpoints.connect import open_chat_backend
from mergeit_hf.endpoints.sending.ledger import RequestLedger
from mergeit_hf.endpoints.sending.sync import run_sync
from mergeit_hf.engines.ray.merge_actor import (
    OUTCOME,
    POSITION,
    REPORT,
    BatchReport,
    MergeActor,
    batch_size_for,
)
from mergeit_hf.engines.ray.travel import actor_keys, merger_for_actors
from mergeit_hf.stage2.merge.merged_pairs import merged_pairs_dataset
from mergeit_hf.stage2.merge.merger import Merger
from mergeit_hf.stage2.merge.results import MergeBatch, MergeOutcome, MergeStats

#: Batches an actor works on at once: the next one starts while the last pairs of the other finish.
CALLS_PER_ACTOR = 2


def merge_stage_ray(
    pairs: Dataset, merger: Merger, max_pairs: int | None = None, actors: int | None = None
) -> tuple[Dataset, MergeBatch]:
    """Stage 2 through merge actors; the same merged pairs dataset and counts as ``merge_stage``."""
    import ray

    limit = len(pairs) if max_pairs is None else min(max_pairs, len(pairs))
    todo = pairs.select(range(limit))
    if limit == 0:
        nothing = MergeBatch([], MergeStats(), "", "")
        return merged_pairs_dataset(pairs, todo, nothing, merger, limit), nothing
    embedded = not (merger.resolved_endpoint or merger.config.provider)
    # The embedded model runs inside each actor: one copy of it, not one per actor.
    actors = 1 if embedded else (actors or max(1, int(ray.cluster_resources().get("CPU", 1)) // 2))
    actors = max(1, min(actors, limit))
    share = _concurrency_share(merger, actors, embedded)
    merged = _merged_stream(todo, merger_for_actors(merger, share), actors, batch_size_for(share), embedded)
    batch = _collected(merged, limit, merger)
    return merged_pairs_dataset(pairs, todo, batch, merger, limit), batch


def _merged_stream(todo: Dataset, merger: Merger, actors: int, batch_size: int, embedded: bool) -> Any:
    import ray
    import ray.data

    table = todo.flatten_indices().add_column(POSITION, list(range(len(todo)))).data.table
    # One block per batch: from one block (what ``from_huggingface`` makes of an in-memory dataset) Ray Data
    # runs one task, on one actor, and the rest of the pool idles.
    blocks = [table.slice(start, batch_size) for start in range(0, len(table), batch_size)]
    return ray.data.from_arrow(blocks).map_batches(
        MergeActor,
        fn_constructor_args=(merger, [ray.put(actor_keys())]),
        batch_size=batch_size,
        batch_format="pyarrow",
        # No more batches queued at an actor than it works on: Ray Data prefers the actor on the node that holds a
        # block (the driver's, for these) and would queue every batch there while the other actors idle.
        compute=ray.data.ActorPoolStrategy(
            size=actors,
            max_tasks_in_flight_per_actor=CALLS_PER_ACTOR,
            max_concurrent_calls_per_actor=CALLS_PER_ACTOR,
            enable_true_multi_threading=True,
        ),
        # An actor mostly waits on the endpoint, but with a CPU share of its own Ray Data's default SPREAD
        # places the pool over the nodes instead of all on the driver's; the embedded model computes: a whole CPU.
        num_cpus=1.0 if embedded else 0.5,
    )


def _collected(merged: Any, limit: int, merger: Merger) -> MergeBatch:
    """Every pair's outcome in input order, and the batches' reports added up; a run-stopping error an actor
    met is raised here (Ray Data then ends the pool)."""
    outcomes: dict[int, MergeOutcome] = {}
    reports: list[BatchReport] = []
    with tqdm(total=limit, desc="Merging pairs", unit="pair", disable=not merger.show_progress) as progress:
        for batch in merged.iter_batches(batch_size=None, batch_format="numpy"):
            for report in _reports(batch[REPORT]):
                reports.append(report)
                merger.ledger.merge(report.ledger)
                progress.set_postfix_str(f"limit {report.limit} per actor", refresh=False)
            done = 0
            for position, payload in zip(batch[POSITION].tolist(), batch[OUTCOME], strict=True):
                if position >= 0:  # a stopped batch's placeholder row
                    done += position not in outcomes
                    outcomes.setdefault(position, pickle.loads(payload))
            progress.update(done)
    if len(outcomes) != limit:  # Ray Data returns each batch once, retried or not: a gap is a lost batch
        raise RuntimeError(f"{limit - len(outcomes)} of {limit} pairs came back from no merge actor")
    return _combined([outcomes[position] for position in range(limit)], reports)


def _reports(cells: Any) -> list[BatchReport]:
    """The reports in one output block (one per batch it joins); a stop raised as the actor met it."""
    reports = [pickle.loads(cell) for cell in cells if cell]
    for report in reports:
        if report.stopped is not None:
            raise report.stopped
    return reports


def _concurrency_share(merger: Merger, actors: int, embedded: bool) -> int | None:
    """Each actor's part of the endpoint's concurrency (``concurrency``, else what the server announces);
    None where neither says: each actor's limit then adapts to what the server gives it."""
    if embedded:
        return None
    total = merger.config.concurrency or run_sync(_announced_concurrency(merger))
    return max(1, total // actors) if total else None


async def _announced_concurrency(merger: Merger) -> int | None:
    backend = await open_chat_backend(merger.endpoint_settings(), merger.config.local_model)
    try:
        return backend.default_concurrency if backend.concurrency_announced else None
    finally:
        await backend.aclose()


def _combined(outcomes: list[MergeOutcome], reports: list[BatchReport]) -> MergeBatch:
    stats = MergeStats()
    for report in reports:
        stats.requests_sent += report.stats.requests_sent
        stats.idle_releases += report.stats.idle_releases
    last = reports[-1] if reports else BatchReport()
    return MergeBatch(outcomes, stats, last.merge_model, last.quality_model, _endpoints_over_actors(reports))


def _endpoints_over_actors(reports: list[BatchReport]) -> dict[str, dict[str, str]]:
    """Each endpoint as the card describes it, with the counts of every actor added up (each actor's last
    report holds its totals) and the limit each actor reached."""
    latest = {report.actor: report for report in reports}
    described: dict[str, dict[str, str]] = {}
    for role, description in (reports[-1].endpoints if reports else {}).items():
        loads = [report.role_loads[role] for report in latest.values() if role in report.role_loads]
        if not loads:
            described[role] = description
            continue
        total = RequestLedger()
        for load in loads:
            total.merge(load.ledger)
        how = "fixed" if loads[0].fixed else "adaptive"
        peaks = ", ".join(str(load.peak_limit) for load in loads)
        described[role] = {
            **description,
            **total.described(),
            "concurrency": f"{how}, at most {peaks} in the {len(loads)} merge actor(s)",
        }
    return described
