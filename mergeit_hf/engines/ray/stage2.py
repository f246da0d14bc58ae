"""Stage 2 on Ray: merge actors, each holding an async client with a share of the endpoint's concurrency
and the shared request cache."""

from __future__ import annotations

import math
from typing import Any

from datasets import Dataset

from mergeit_hf.config import MergeItConfig
from mergeit_hf.endpoints.connect import open_chat_backend
from mergeit_hf.endpoints.sending.ledger import RequestLedger
from mergeit_hf.endpoints.sending.sync import run_sync
from mergeit_hf.stage2.merge.merged_pairs import merged_pairs_dataset
from mergeit_hf.stage2.merge.merger import Merger
from mergeit_hf.stage2.merge.results import MergeBatch, MergeStats


class _MergeActor:
    """One async client per actor, with its share of the endpoint's concurrency and the shared request cache."""

    def __init__(self, merger: Merger) -> None:
        self.merger = merger

    def merge(self, pairs: list[dict[str, Any]]) -> tuple[MergeBatch, RequestLedger]:
        """The outcomes, and what this actor sent (the driver adds it to the run's count)."""
        batch = run_sync(self.merger.merge_pairs(iter(pairs), window="auto", total=len(pairs)))
        return batch, self.merger.ledger


def merge_stage_ray(
    pairs: Dataset, merger: Merger, max_pairs: int | None = None, actors: int | None = None
) -> tuple[Dataset, MergeBatch]:
    """Stage 2 through merge actors; the same merged pairs dataset and counts as ``merge_stage``."""
    import ray

    limit = len(pairs) if max_pairs is None else min(max_pairs, len(pairs))
    todo = pairs.select(range(limit))
    embedded = not (merger.resolved_endpoint or merger.config.provider)
    # The embedded model runs inside each actor: one copy of it, not one per actor.
    actors = 1 if embedded else (actors or max(1, int(ray.cluster_resources().get("CPU", 1)) // 2))
    actors = max(1, min(actors, limit or 1))
    share = _concurrency_share(merger, actors, embedded)
    config = merger.config if share is None else _with_concurrency(merger.config, share)
    remote = ray.remote(num_cpus=0)(_MergeActor)
    workers = [
        # Each actor has its share already: it must not split it again with the others on its node.
        remote.remote(Merger(merger.endpoint, config, merger.cache_dir, merger.use_cache, share_fixed_limit=False))
        for _ in range(actors)
    ]
    rows = todo.to_list()
    size = math.ceil(len(rows) / actors) if rows else 0
    shards = [rows[i * size : (i + 1) * size] for i in range(actors)] if rows else []
    answers = ray.get([worker.merge.remote(shard) for worker, shard in zip(workers, shards, strict=False) if shard])
    for worker in workers:
        ray.kill(worker)
    for _, ledger in answers:
        merger.ledger.merge(ledger)
    batch = _combined([batch for batch, _ in answers], merger)
    return merged_pairs_dataset(pairs, todo, batch, merger, limit), batch


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


def _with_concurrency(config: MergeItConfig, concurrency: int) -> MergeItConfig:
    return MergeItConfig.from_dict({**config.to_dict(), "concurrency": concurrency})


def _combined(batches: list[MergeBatch], merger: Merger) -> MergeBatch:
    if not batches:
        return MergeBatch([], MergeStats(), "", "", {})
    stats = MergeStats()
    for batch in batches:
        for name, value in vars(batch.stats).items():
            setattr(stats, name, getattr(stats, name) + value)
    first = batches[0]
    outcomes = [outcome for batch in batches for outcome in batch.outcomes]
    return MergeBatch(outcomes, stats, first.merge_model, first.quality_model, first.endpoints)
