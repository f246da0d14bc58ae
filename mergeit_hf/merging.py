"""Stage 2: an LLM merges each pair into one example; a quality gate keeps the better merges.

``pairs.map(mergeit_hf.merge_batch, batched=True)`` (or unbatched) adds the merged fields, the three
quality scores, the gate's decision and the provenance of the merge. ``Merger(...)`` builds a
configured callable of the same kind. Requests inside a batch run concurrently under a bound, every
answer is cached on disk the moment it arrives, and each pair ends accepted, rejected or failed with
a reason: none is lost.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, TypeVar

from tqdm.auto import tqdm

from mergeit_hf.backends import (
    ChatBackend,
    ChatReply,
    EndpointBackend,
    LocalLlamaBackend,
    json_response_format,
)
from mergeit_hf.config import MergeItConfig
from mergeit_hf.embedding import join_text
from mergeit_hf.errors import EndpointError, MergeItError, QualityScoringError
from mergeit_hf.prompts import PromptTemplate
from mergeit_hf.quality import QualityScore, expected_score, gate_explanation, passes_gate
from mergeit_hf.request_cache import RequestCache, payload_hash

MergeStatus = Literal["accepted", "rejected", "failed", "skipped"]
MERGE_FIELDS = ("instruction", "input", "output")
MERGE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {name: {"type": "string"} for name in MERGE_FIELDS},
    "required": list(MERGE_FIELDS),
    "additionalProperties": False,
}
_MIN_SCORES_BEFORE_STOPPING = 12
T = TypeVar("T")


def default_cache_dir() -> Path:
    return Path(os.environ.get("MERGEIT_CACHE") or Path.home() / ".cache" / "mergeit-hf" / "requests")


class MergeParseError(MergeItError, ValueError):
    """The model's answer is not the JSON object the merge prompt asks for."""


def parse_merge_output(reply: ChatReply) -> dict[str, str]:
    """Strict: one JSON object with exactly instruction/input/output, all strings, instruction and
    output non-empty."""
    if reply.finish_reason == "length":
        raise MergeParseError("answer cut off at max_new_tokens")
    try:
        # strict=False admits raw newlines inside strings, which small models emit; the structure stays strict.
        value = json.loads(reply.content, strict=False)
    except json.JSONDecodeError as exc:
        raise MergeParseError(f"not JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(value, dict):
        raise MergeParseError(f"JSON {type(value).__name__}, expected an object")
    if set(value) != set(MERGE_FIELDS):
        raise MergeParseError(f"keys {sorted(value)}, expected {list(MERGE_FIELDS)}")
    if not all(isinstance(value[name], str) for name in MERGE_FIELDS):
        raise MergeParseError("every field must be a string")
    merged = {name: value[name].strip() for name in MERGE_FIELDS}
    empty = [name for name in ("instruction", "output") if not merged[name]]
    if empty:
        raise MergeParseError(f"empty {' and '.join(empty)}")
    return merged


@dataclass(frozen=True)
class MergeOutcome:
    """What happened to one pair."""

    status: MergeStatus
    reason: str
    merged: dict[str, str] | None = None
    quality_merged: float | None = None
    quality_a: float | None = None
    quality_b: float | None = None
    attempts: int = 0
    scores_incomplete: int = 0
    completed_at: str = ""


@dataclass
class MergeStats:
    """Counts over a run; ``acceptance_rate`` and ``incomplete_fraction`` explain it at a glance."""

    accepted: int = 0
    rejected: int = 0
    failed: int = 0
    scores: int = 0
    scores_incomplete: int = 0
    scores_unavailable: int = 0
    requests_sent: int = 0
    cache_hits: int = 0
    failure_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def pairs(self) -> int:
        return self.accepted + self.rejected + self.failed

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.pairs if self.pairs else 0.0

    @property
    def incomplete_fraction(self) -> float:
        return self.scores_incomplete / self.scores if self.scores else 0.0

    def add(self, outcome: MergeOutcome) -> None:
        setattr(self, outcome.status, getattr(self, outcome.status) + 1)
        if outcome.status == "failed":
            kind = outcome.reason.split(":")[0]
            self.failure_reasons[kind] = self.failure_reasons.get(kind, 0) + 1


@dataclass
class _Run:
    """Everything one call shares: backend, cache, concurrency bound, templates, counters."""

    backend: ChatBackend
    cache: RequestCache
    semaphore: asyncio.Semaphore
    merge_template: PromptTemplate
    quality_template: PromptTemplate
    config: MergeItConfig
    stats: MergeStats
    in_flight: dict[str, asyncio.Future] = field(default_factory=dict)


@dataclass(frozen=True)
class Merger:
    """A configured, picklable stage 2 function for ``Dataset.map`` (batched or not).

    endpoint: URL of a TGI-compatible server; None reads ``MERGEIT_ENDPOINT`` at call time and falls
        back to the embedded llama.cpp model when it is unset too.
    config: stage 2 parameters (templates, generation, retries, concurrency, α, thresholds).
    cache_dir: folder of the request cache; None uses ``MERGEIT_CACHE`` or ~/.cache/mergeit-hf.
    use_cache: False sends every request, keeping nothing on disk.
    The token is read from ``HF_TOKEN`` or the HF login when requests are sent; it is never stored.
    """

    endpoint: str | None = None
    config: MergeItConfig = field(default_factory=MergeItConfig)
    cache_dir: str | None = None
    use_cache: bool = True
    show_progress: bool = False

    @property
    def resolved_endpoint(self) -> str | None:
        return self.endpoint or os.environ.get("MERGEIT_ENDPOINT") or None

    def __getstate__(self) -> dict[str, Any]:
        # The endpoint taken from the environment is part of what datasets fingerprints, so changing
        # MERGEIT_ENDPOINT never reuses another endpoint's cached map results.
        return {**self.__dict__, "_resolved_endpoint": self.resolved_endpoint}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            if name != "_resolved_endpoint":
                object.__setattr__(self, name, value)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        batched = isinstance(batch["pair_id"], list)
        pairs = _rows_of(batch) if batched else [batch]
        templates = self._templates()
        outcomes, _, model_id = run_sync(self.merge_pairs(pairs, templates))
        columns = outcome_columns(outcomes, model_id, self.config, templates)
        return columns if batched else {name: values[0] for name, values in columns.items()}

    def _templates(self) -> tuple[PromptTemplate, PromptTemplate]:
        return PromptTemplate.load(self.config.merge_template), PromptTemplate.load(self.config.quality_template)

    def make_backend(self) -> ChatBackend:
        endpoint = self.resolved_endpoint
        if endpoint:
            return EndpointBackend(
                endpoint, timeout_s=self.config.request_timeout_s, attempts=self.config.request_retries
            )
        return LocalLlamaBackend()

    async def merge_pairs(
        self, pairs: list[dict[str, Any]], templates: tuple[PromptTemplate, PromptTemplate] | None = None
    ) -> tuple[list[MergeOutcome], MergeStats, str]:
        """Merge, score and gate every pair concurrently; returns outcomes in input order."""
        backend = self.make_backend()
        cache = RequestCache((self.cache_dir or default_cache_dir()) if self.use_cache else None)
        try:
            await backend.probe()
            merge_template, quality_template = templates or self._templates()
            concurrency = self.config.concurrency or backend.default_concurrency
            run = _Run(
                backend,
                cache,
                asyncio.Semaphore(concurrency),
                merge_template,
                quality_template,
                self.config,
                MergeStats(),
            )
            progress = tqdm(total=len(pairs), desc="Merging pairs", unit="pair", disable=not self.show_progress)
            outcomes = await asyncio.gather(*(_merge_and_track(run, pair, progress) for pair in pairs))
            progress.close()
            run.stats.cache_hits = cache.hits
            return list(outcomes), run.stats, backend.model_id
        finally:
            cache.close()
            await backend.aclose()


async def _merge_and_track(run: _Run, pair: dict[str, Any], progress: Any) -> MergeOutcome:
    outcome = await _merge_one(run, pair)
    run.stats.add(outcome)
    progress.update(1)
    return outcome


async def _merge_one(run: _Run, pair: dict[str, Any]) -> MergeOutcome:
    a, b = _side(pair, "a"), _side(pair, "b")
    merged_task = asyncio.ensure_future(_request_merge(run, a, b))
    score_a, score_b = await asyncio.gather(_score(run, a), _score(run, b))
    try:
        merged, attempts, completed_at = await merged_task
    except (MergeParseError, EndpointError) as exc:
        kind = "unparseable merge" if isinstance(exc, MergeParseError) else "endpoint error"
        return _failed(f"{kind}: {exc}", score_a, score_b, run.config.parse_retries + 1)
    score_m = await _score(run, merged)
    incomplete = sum(not s.complete for s in (score_a, score_b, score_m) if isinstance(s, QualityScore))
    for label, score in (("merged", score_m), ("a", score_a), ("b", score_b)):
        if isinstance(score, EndpointError):
            return _failed(f"endpoint error: scoring {label}: {score}", score_a, score_b, attempts, merged)
        if not score.available:
            reason = f"quality score unavailable: no digit 1-6 among the top logprobs for {label}"
            return _failed(reason, score_a, score_b, attempts, merged)
    qm, qa, qb = score_m.value, score_a.value, score_b.value
    status: MergeStatus = "accepted" if passes_gate(qm, qa, qb, run.config.alpha) else "rejected"
    reason = gate_explanation(qm, qa, qb, run.config.alpha)
    return MergeOutcome(status, reason, merged, qm, qa, qb, attempts, incomplete, completed_at)


def _failed(reason: str, score_a: Any, score_b: Any, attempts: int, merged: dict | None = None) -> MergeOutcome:
    value = lambda s: s.value if isinstance(s, QualityScore) else None  # noqa: E731
    return MergeOutcome("failed", reason, merged, None, value(score_a), value(score_b), attempts)


async def _request_merge(run: _Run, a: dict[str, str], b: dict[str, str]) -> tuple[dict[str, str], int, str]:
    messages = [{"role": "user", "content": run.merge_template.render(a=a, b=b)}]
    problems = []
    for attempt in range(run.config.parse_retries + 1):
        params = merge_params(run.config, attempt)
        reply, completed_at = await _complete(run, run.merge_template, messages, params)
        try:
            return parse_merge_output(reply), attempt + 1, completed_at
        except MergeParseError as exc:
            problems.append(f"attempt {attempt + 1}: {exc}")
    raise MergeParseError(f"no valid JSON after {len(problems)} attempts ({'; '.join(problems)})")


def merge_params(config: MergeItConfig, attempt: int) -> dict[str, Any]:
    """Generation parameters of a merge request; each parse retry gets a new seed."""
    params: dict[str, Any] = {
        "max_tokens": config.max_new_tokens,
        "temperature": config.temperature,
        "seed": config.seed + attempt,
        "response_format": json_response_format(MERGE_SCHEMA),
    }
    if config.top_p < 1.0:  # TGI rejects top_p=1.0; leaving it out means the same thing
        params["top_p"] = config.top_p
    return params


def score_params(config: MergeItConfig) -> dict[str, Any]:
    # temperature 1.0: the logprobs are those of the model itself, with no warping.
    return {
        "max_tokens": 1,
        "temperature": 1.0,
        "seed": config.seed,
        "logprobs": True,
        "top_logprobs": config.top_logprobs,
    }


async def _score(run: _Run, row: dict[str, str]) -> QualityScore | EndpointError:
    instruction = join_text((row["instruction"], row.get("input", "")))
    messages = [
        {
            "role": "user",
            "content": run.quality_template.render(instruction=instruction, output=row["output"]),
        }
    ]
    try:
        reply, _ = await _complete(run, run.quality_template, messages, score_params(run.config))
    except EndpointError as exc:
        return exc
    score = expected_score(reply.first_top_logprobs)
    _count_score(run, score)
    return score


def _count_score(run: _Run, score: QualityScore) -> None:
    stats, config = run.stats, run.config
    stats.scores += 1
    stats.scores_incomplete += not score.complete
    stats.scores_unavailable += not score.available
    if stats.scores >= _MIN_SCORES_BEFORE_STOPPING and stats.incomplete_fraction > config.max_missing_score_fraction:
        raise QualityScoringError(
            f"{stats.scores_incomplete} of {stats.scores} quality scores lacked some of the digits 1-6 among the "
            f"top {config.top_logprobs} logprobs ({stats.incomplete_fraction:.0%} > "
            f"max_missing_score_fraction={config.max_missing_score_fraction}). Use a Deita scorer model, raise "
            "top_logprobs (TGI: launch with a higher --max-top-n-tokens), or raise the threshold."
        )


async def _complete(
    run: _Run, template: PromptTemplate, messages: list[dict[str, str]], params: dict[str, Any]
) -> tuple[ChatReply, str]:
    """One request, answered from the cache, from an identical request already in flight, or sent."""
    payload = {
        "model": run.backend.model_id,
        "template_sha256": template.sha256,
        "messages": messages,
        "params": params,
    }
    key = payload_hash(payload)
    cached = run.cache.get(key)
    if cached is not None:
        return ChatReply.from_dict(cached), cached["completed_at"]
    if key not in run.in_flight:  # identical payloads (e.g. two identical merges to score) are sent once
        run.in_flight[key] = asyncio.ensure_future(_send(run, key, payload, messages, params))
    return await asyncio.shield(run.in_flight[key])


async def _send(
    run: _Run, key: str, payload: dict[str, Any], messages: list[dict[str, str]], params: dict[str, Any]
) -> tuple[ChatReply, str]:
    try:
        async with run.semaphore:
            reply = await run.backend.chat(messages, params)
    finally:
        run.in_flight.pop(key, None)
    run.stats.requests_sent += 1
    completed_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    run.cache.put(key, payload, {**reply.to_dict(), "completed_at": completed_at})
    return reply, completed_at


def _side(pair: dict[str, Any], side: str) -> dict[str, str]:
    return {name: pair[f"{side}_{name}"] or "" for name in MERGE_FIELDS}


def _rows_of(batch: dict[str, list]) -> list[dict[str, Any]]:
    names = list(batch)
    return [dict(zip(names, values, strict=True)) for values in zip(*batch.values(), strict=True)]


def outcome_columns(
    outcomes: list[MergeOutcome], model_id: str, config: MergeItConfig, templates: tuple[PromptTemplate, ...]
) -> dict[str, list]:
    """Stage 2 columns for a batch of pairs, provenance included."""
    from mergeit_hf import __version__

    merge_template, quality_template = templates
    generation = json.dumps(merge_params(config, 0), sort_keys=True)
    n = len(outcomes)
    return {
        "merged_instruction": [(o.merged or {}).get("instruction", "") for o in outcomes],
        "merged_input": [(o.merged or {}).get("input", "") for o in outcomes],
        "merged_output": [(o.merged or {}).get("output", "") for o in outcomes],
        "merge_status": [o.status for o in outcomes],
        "merge_reason": [o.reason for o in outcomes],
        "quality_merged": [o.quality_merged for o in outcomes],
        "quality_a": [o.quality_a for o in outcomes],
        "quality_b": [o.quality_b for o in outcomes],
        "quality_scores_incomplete": [o.scores_incomplete for o in outcomes],
        "merge_attempts": [o.attempts for o in outcomes],
        "alpha": [config.alpha] * n,
        "merge_model": [model_id] * n,
        "merge_template": [merge_template.name] * n,
        "merge_template_sha256": [merge_template.sha256] * n,
        "quality_template_sha256": [quality_template.sha256] * n,
        "generation_params": [generation] * n,
        "merged_at": [o.completed_at for o in outcomes],
        "mergeit_version": [__version__] * n,
    }


def run_sync(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine from sync code, also where an event loop already runs (Jupyter, Gradio)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


#: ``pairs.map(mergeit_hf.merge_batch, batched=True)``: ``MERGEIT_ENDPOINT`` or the embedded model.
merge_batch = Merger()
