"""``mergeit run --batch``: stage 2 in rounds over the request cache.

Each round runs the very stage 2 a synchronous run does, with a collector in place of sending: a request whose
answer is cached is answered from it, any other is collected and its pair waits (status ``pending``). The
round's requests go to the provider as batch files (``endpoints.batch.rounds``) and their answers into the
cache. Merges and source scores come in the first round, the merges' scores and the judge in the next, gate
re-merges after. A round that finds nothing missing is the result: the same rows, statuses and card a
synchronous run with the same answers gives.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from datasets import Dataset

from mergeit_hf.endpoints.batch.api import BatchApi
from mergeit_hf.endpoints.batch.limits import BatchLimits
from mergeit_hf.endpoints.batch.rounds import BatchRounds
from mergeit_hf.endpoints.batch.state import BatchState
from mergeit_hf.endpoints.http.transport import api_key, base_url
from mergeit_hf.endpoints.sending.collect import BatchCollector
from mergeit_hf.endpoints.sending.sync import run_sync
from mergeit_hf.engines.choice import Engine
from mergeit_hf.errors import ConfigError, EndpointError
from mergeit_hf.stage2.merge.merger import Merger
from mergeit_hf.stage2.merge.results import MergeBatch

logger = logging.getLogger(__name__)
BATCH_FOLDER = "batch"  # inside the output folder: state.json and each round's files
STALLED_ROUNDS = 3  # rounds in a row that brought no answer and gave nothing up: the provider is not answering


def batch_api(merger: Merger, engine: Engine) -> BatchApi:
    """The merge endpoint's batch API, once the run's settings allow batching (else the reason why not)."""
    settings = merger.endpoint_settings()
    if not settings.url or settings.provider:
        raise ConfigError("--batch needs an endpoint URL of an OpenAI-compatible API (--endpoint or MERGEIT_ENDPOINT)")
    if engine.name != "datasets":
        raise ConfigError("--batch runs stage 2 with the datasets engine: drop --engine ray")
    if not merger.use_cache:
        raise ConfigError("--batch keeps every answer in the request cache between rounds: drop --no-cache")
    key = api_key(settings.key_variable)
    return BatchApi(
        base_url(settings.url),
        key,
        key_variable=settings.key_variable,
        timeout_s=settings.timeout_s,
        attempts=settings.attempts,
    )


def check_batch_api(merger: Merger, engine: Engine) -> None:
    """Before stage 1: the endpoint has a batch API (a server without one stops the run here, named)."""

    async def check() -> None:
        api = batch_api(merger, engine)
        try:
            await api.check()
        except EndpointError as exc:
            raise EndpointError(f"--batch: {api.url} has no usable batch API (GET /v1/batches): {exc}") from None
        finally:
            await api.aclose()

    run_sync(check())


def merge_in_rounds(
    pairs: Dataset, merger: Merger, engine: Engine, output: Path, max_pairs: int | None = None
) -> tuple[Dataset, MergeBatch, dict[str, Any]]:
    """The merged pairs and batch of the round that found every answer cached, and the rounds' summary."""
    api = batch_api(merger, engine)
    state = BatchState.open(output / BATCH_FOLDER, api.url)
    cache = merger.open_cache()
    config = merger.config
    limits = BatchLimits(max_tokens=config.batch_enqueued_tokens)
    rounds = BatchRounds(api, state, cache, config.request_retries, config.batch_poll_s, limits=limits)
    try:
        left = state.in_flight
        if left is not None:  # a killed run's round: wait for it, submit nothing new for it
            logger.info("batch round %d was in flight: resuming it", left.round)
            run_sync(rounds.finish(left))
        stalled = 0
        while True:
            collector = BatchCollector(given_up=dict(state.given_up), structured_output=state.structured_output)
            merged_pairs, batch = engine.merge_stage(pairs, dataclasses.replace(merger, collector=collector), max_pairs)
            if not collector.requests:
                return merged_pairs, batch, {"used": True, **state.summary()}
            given_up, form = len(state.given_up), state.structured_output
            record = rounds.submit(collector)
            logger.info(
                "batch round %d: %d requests (%s)",
                record.round,
                record.requests,
                ", ".join(f"{role} {n}" for role, n in record.by_role.items()),
            )
            run_sync(rounds.finish(record))
            moved = record.answered or len(state.given_up) != given_up or state.structured_output != form
            stalled = 0 if moved else stalled + 1
            if stalled >= STALLED_ROUNDS:
                raise EndpointError(
                    f"{STALLED_ROUNDS} batch rounds in a row brought no answer from {api.url}; "
                    f"`mergeit batch-status {output}` shows what the provider said"
                )
    finally:
        cache.close()
        run_sync(api.aclose())
