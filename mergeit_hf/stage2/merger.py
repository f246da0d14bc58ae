"""Stage 2: an LLM merges each pair into one example; the gate keeps merges that are better and complete.

``pairs.map(mergeit_hf.merge_batch, batched=True)`` (or unbatched) adds the merged fields, the quality
scores, each source's retention, the gate's decision and the provenance of the merge. ``Merger(...)``
builds a configured callable of the same kind. Requests run concurrently under a bound and are cached
(``endpoints.scheduler``); a request's parameters come from ``merge_request``, answers are parsed by
``merge_output``, scores come from ``scoring``, retention from ``retention``, the decision from ``gate``,
results are ``merge_results`` and the columns ``merge_columns``. Each pair ends accepted, rejected or
failed with a reason.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import AsyncIterator, Iterable, Sequence, Sized
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from tqdm.auto import tqdm

from mergeit_hf.config import MergeItConfig
from mergeit_hf.endpoints.base import ChatBackend, TokenUsage
from mergeit_hf.endpoints.completions import CompletionEndpointBackend
from mergeit_hf.endpoints.connect import EndpointSettings, open_chat_backend, open_completion_backend
from mergeit_hf.endpoints.request_cache import RequestCache
from mergeit_hf.endpoints.scheduler import (
    RequestScheduler,
    current_usage,
    default_cache_dir,
    read_outcome,
    run_sync,
)
from mergeit_hf.errors import EndpointConfigError, EndpointError, TemplateError
from mergeit_hf.prompts import PromptTemplate
from mergeit_hf.stage1.embedding import Embedder
from mergeit_hf.stage2.batched_embedding import EmbeddingBatcher
from mergeit_hf.stage2.gate import SIDES, AttemptScores, GateDecision, choose, decide
from mergeit_hf.stage2.merge_columns import outcome_columns
from mergeit_hf.stage2.merge_output import MergeParseError, parse_merge_output
from mergeit_hf.stage2.merge_request import merge_messages, merge_params, merge_sources
from mergeit_hf.stage2.merge_results import MergeAttempt, MergeBatch, MergeOutcome, MergeStats
from mergeit_hf.stage2.quality import QualityScore
from mergeit_hf.stage2.retention import merged_chunks, row_text, source_retentions
from mergeit_hf.stage2.scoring import QualityScorer, ScoreCounts

#: Pairs in flight per server slot when merging a stream: a pair's requests are partly sequential
#: (merge and source scores, then the merge's score), so a few pairs per slot keep every slot busy.
WINDOW_PER_SLOT = 4

__all__ = [
    "MergeBatch",
    "MergeOutcome",
    "MergeStats",
    "Merger",
    "Session",
    "default_cache_dir",
    "merge_batch",
    "run_sync",
]


@dataclass
class Session:
    """What stage 2 holds open while it sends: the request cache, the merge scheduler and the quality
    scorer (on its own scheduler when a scorer endpoint is set). Opened by ``Merger.session()``."""

    cache: RequestCache
    merges: RequestScheduler | None  # None in a scoring-only session
    scorer: QualityScorer

    @property
    def merge_model(self) -> str:
        """The merge model as the card shows it (a local path's file name, never the user's folders)."""
        return self.merges.backend.describe()["model"] if self.merges else ""

    @property
    def quality_model(self) -> str:
        return self.scorer.scheduler.backend.describe()["model"]

    def endpoints(self) -> dict[str, dict[str, str]]:
        """What each endpoint is and how it was spoken to (kind, model, structured output or route)."""
        described = {"merge": self.merges.backend.describe()} if self.merges else {}
        if self.scorer.raw:
            described["scorer"] = self.scorer.scheduler.backend.describe()
        return described

    @property
    def requests_sent(self) -> int:
        schedulers = {id(s): s for s in (self.merges, self.scorer.scheduler) if s is not None}
        return sum(s.requests_sent for s in schedulers.values())


@dataclass
class _Run:
    """Everything one call shares: the session, the merge template and the embedder."""

    session: Session
    merge_template: PromptTemplate
    embeddings: EmbeddingBatcher
    config: MergeItConfig
    stats: MergeStats
    complexity: QualityScorer | None = None  # Deita's complexity prompt, with ``complexity_scores``

    @property
    def scheduler(self) -> RequestScheduler:
        assert self.session.merges is not None, "merging needs a session opened with merging=True"
        return self.session.merges

    @property
    def scorer(self) -> QualityScorer:
        return self.session.scorer


def stage2_templates(config: MergeItConfig) -> tuple[PromptTemplate, PromptTemplate]:
    """The merge and quality templates ``config`` names, loaded (syntax errors name file and line)."""
    merge = PromptTemplate.load(config.merge_template)
    if config.max_group_size > 2 and "sources" not in merge.variables:
        # A pair template renders a and b only: the other members of a group would vanish from the prompt.
        raise TemplateError(
            f"{merge.path} uses only a and b, but max_group_size={config.max_group_size} merges groups: "
            "loop over `sources` (every member of the group) as prompts/merge.jinja does"
        )
    return merge, PromptTemplate.load(config.quality_template)


@dataclass(frozen=True)
class Merger:
    """A configured, picklable stage 2 function for ``Dataset.map`` (batched or not).

    endpoint: URL of a server: TGI, vLLM, SGLang, llama.cpp or an OpenAI-compatible API (with or without
        a trailing ``/v1``); None reads ``MERGEIT_ENDPOINT`` at call time and falls back to HF Inference
        Providers when ``config.provider`` is set, else to the embedded llama.cpp model (``config.local_model``).
        The model each request names is ``config.model``, else ``MERGEIT_MODEL``, else what the server says.
    config: stage 2 parameters (templates, generation, retries, concurrency, α, min_retention, and
        ``scorer_endpoint``: a server of its own for quality scores, else ``MERGEIT_SCORER_ENDPOINT``, else
        the merge model scores too).
    cache_dir: folder of the request cache; None uses ``MERGEIT_CACHE`` or ~/.cache/mergeit-hf.
    use_cache: False sends every request, keeping nothing on disk.
    The key is read when requests are sent, from ``MERGEIT_API_KEY`` (the scorer: ``MERGEIT_SCORER_API_KEY``),
    else ``HF_TOKEN`` or the HF login; it is never stored, logged or recorded.
    """

    endpoint: str | None = None
    config: MergeItConfig = field(default_factory=MergeItConfig)
    cache_dir: str | None = None
    use_cache: bool = True
    show_progress: bool = False

    @property
    def resolved_endpoint(self) -> str | None:
        return self.endpoint or os.environ.get("MERGEIT_ENDPOINT") or None

    @property
    def resolved_model(self) -> str | None:
        return self.config.model or os.environ.get("MERGEIT_MODEL") or None

    @property
    def resolved_scorer_endpoint(self) -> str | None:
        return self.config.scorer_endpoint or os.environ.get("MERGEIT_SCORER_ENDPOINT") or None

    def __getstate__(self) -> dict[str, Any]:
        # Endpoints and model taken from the environment are part of what datasets fingerprints, so changing
        # MERGEIT_ENDPOINT, MERGEIT_SCORER_ENDPOINT or MERGEIT_MODEL never reuses another server's map results.
        resolved = (self.resolved_endpoint, self.resolved_scorer_endpoint, self.resolved_model)
        return {**self.__dict__, "_resolved": resolved}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            if name != "_resolved":
                object.__setattr__(self, name, value)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        batched = isinstance(batch["pair_id"], list)
        pairs = _rows_of(batch) if batched else [batch]
        templates = self.templates()
        merged = run_sync(self.merge_pairs(pairs, templates))
        columns = outcome_columns(merged.outcomes, self.config, templates, merged.merge_model, merged.quality_model)
        return columns if batched else {name: values[0] for name, values in columns.items()}

    def templates(self) -> tuple[PromptTemplate, PromptTemplate]:
        return stage2_templates(self.config)

    def endpoint_settings(self) -> EndpointSettings:
        """The merge endpoint: a URL, a provider, or neither (the embedded model)."""
        config = self.config
        return EndpointSettings(
            url=self.resolved_endpoint,
            model=self.resolved_model,
            provider=config.provider,
            key_variable="MERGEIT_API_KEY",
            role="LLM endpoint",
            timeout_s=config.request_timeout_s,
            attempts=config.request_retries,
        )

    def scorer_settings(self) -> EndpointSettings | None:
        """The scorer endpoint of its own, if one is set."""
        url, config = self.resolved_scorer_endpoint, self.config
        if not url:
            return None
        return EndpointSettings(
            url=url,
            model=config.scorer_model,
            key_variable="MERGEIT_SCORER_API_KEY",
            role="scorer endpoint",
            timeout_s=config.request_timeout_s,
            attempts=config.request_retries,
        )

    def open_cache(self) -> RequestCache:
        return RequestCache((self.cache_dir or default_cache_dir()) if self.use_cache else None)

    @staticmethod
    async def open_scheduler(
        backend: ChatBackend | CompletionEndpointBackend, cache: RequestCache, concurrency: int
    ) -> RequestScheduler:
        """Bind an opened backend to the cache, with a connection pool as large as its concurrency."""
        size_pool = getattr(backend, "size_pool", None)
        if size_pool is not None:
            await size_pool(concurrency)
        return RequestScheduler(backend, cache, concurrency)

    @asynccontextmanager
    async def session(
        self,
        quality_template: PromptTemplate | None = None,
        counts: ScoreCounts | None = None,
        merging: bool = True,
    ) -> AsyncIterator[Session]:
        """Open the cache and the backends (each probed first), and close everything however the block ends.

        merging: False opens only what scoring needs (the scorer check with a scorer endpoint of its own).
        """
        cache = self.open_cache()
        scorer_settings = self.scorer_settings()
        backends: list[Any] = []
        try:
            merges = None
            if merging or not scorer_settings:
                backends.append(await open_chat_backend(self.endpoint_settings(), self.config.local_model))
                # config.concurrency bounds the merge endpoint; else the server's own (``/info``) or 8.
                concurrency = self.config.concurrency or backends[-1].default_concurrency
                merges = await self.open_scheduler(backends[-1], cache, concurrency)
            scoring = merges
            if scorer_settings:
                backends.append(await open_completion_backend(scorer_settings))
                scoring = await self.open_scheduler(backends[-1], cache, backends[-1].default_concurrency)
            assert scoring is not None
            template = quality_template or self.templates()[1]
            scorer = QualityScorer(
                scoring, template, self.config, counts or ScoreCounts(), raw=scorer_settings is not None
            )
            yield Session(cache, merges, scorer)
        finally:
            cache.close()
            for backend in backends:
                await backend.aclose()

    async def merge_pairs(
        self,
        pairs: Iterable[dict[str, Any]],
        templates: tuple[PromptTemplate, PromptTemplate] | None = None,
        window: int | Literal["auto"] | None = None,
        total: int | None = None,
    ) -> MergeBatch:
        """Merge, score and gate every pair concurrently; outcomes in input order.

        window: pairs in flight at once, taken from ``pairs`` as earlier ones finish, so a long stream keeps
            the server's slots busy without a gap between batches; "auto" is 4 × the endpoint's concurrency
            (a pair's requests are partly sequential); None starts every pair at once (a ``map`` batch).
        """
        merge_template, quality_template = templates or self.templates()
        counts = ScoreCounts()
        async with self.session(quality_template, counts) as session:
            config = self.config
            embedder = Embedder(config.embedding_model, config.text_columns, config.embedding_batch_size)
            run = _Run(
                session, merge_template, EmbeddingBatcher(embedder), config, MergeStats(), complexity_scorer(session)
            )
            if window == "auto":
                window = WINDOW_PER_SLOT * (session.merges.concurrency if session.merges else 1)
            total = total if total is not None else (len(pairs) if isinstance(pairs, Sized) else None)
            progress = tqdm(total=total, desc="Merging pairs", unit="pair", disable=not self.show_progress)
            outcomes = await _merge_in_order(run, pairs, window, progress)
            progress.close()
            stats = run.stats
            stats.scores, stats.scores_incomplete, stats.scores_unavailable = (
                counts.scores,
                counts.incomplete,
                counts.unavailable,
            )
            stats.requests_sent, stats.cache_hits = session.requests_sent, session.cache.hits
            stats.idle_releases = session.merges.idle_releases if session.merges else 0
            return MergeBatch(list(outcomes), stats, session.merge_model, session.quality_model, session.endpoints())


def complexity_scorer(session: Session) -> QualityScorer | None:
    """Deita's complexity prompt on the scorer's scheduler, when ``complexity_scores`` asks for it."""
    config = session.scorer.config
    if not config.complexity_scores:
        return None
    return session.scorer.with_template(PromptTemplate.load(config.complexity_template))


async def _merge_in_order(
    run: _Run, pairs: Iterable[dict[str, Any]], window: int | None, progress: Any
) -> list[MergeOutcome]:
    started: list[asyncio.Future] = []
    try:
        if window is None:
            started = [asyncio.ensure_future(_merge_and_track(run, pair, progress)) for pair in pairs]
        else:
            pending: set[asyncio.Future] = set()
            for pair in pairs:
                if len(pending) >= window:
                    done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        task.result()  # a run-stopping error stops feeding at once
                task = asyncio.ensure_future(_merge_and_track(run, pair, progress))
                started.append(task)
                pending.add(task)
        return list(await asyncio.gather(*started))
    except BaseException:
        # A run-stopping error (a refused key or model, too many missing digits, Ctrl-C): stop every pair
        # still running and read what each ended with, so asyncio has no unread exception to print.
        for task in started:
            task.cancel()
        await asyncio.gather(*started, return_exceptions=True)
        raise


async def _merge_and_track(run: _Run, pair: dict[str, Any], progress: Any) -> MergeOutcome:
    usage = TokenUsage()
    current_usage.set(usage)  # this pair's task (and the requests it starts) count into ``usage``
    sources = merge_sources(pair)
    outcome = await _merge_one(run, sources)
    if run.complexity is not None and outcome.merged is not None and outcome.status != "failed":
        outcome = await _with_complexity(run.complexity, sources, outcome)
    if usage.replies:
        outcome = dataclasses.replace(outcome, tokens=(usage.prompt, usage.completion))
    run.stats.add(outcome)
    progress.update(1)
    return outcome


def _abandon(task: asyncio.Future) -> None:
    """Stop a request no longer wanted, and read its outcome whenever it ends (no unread exception)."""
    task.cancel()
    task.add_done_callback(read_outcome)


async def _merge_one(run: _Run, sources: list[dict[str, str]]) -> MergeOutcome:
    first_merge = asyncio.ensure_future(_request_merge(run, sources, 0))
    try:
        scores = await asyncio.gather(*(run.scorer.score(source) for source in sources))
    except BaseException:
        _abandon(first_merge)
        raise
    for side, score in zip(SIDES, scores, strict=False):
        problem = _score_problem(side, score)
        if problem:
            _abandon(first_merge)
            return _failed(problem, scores, 0)
    qualities = tuple(score.value for score in scores)
    attempts: list[MergeAttempt] = []
    decisions: list[GateDecision] = []  # one per scored attempt, each decided once
    incomplete = sum(not s.complete for s in scores)
    requests = 0
    for gate_attempt in range(run.config.gate_retries + 1):
        merge = first_merge if gate_attempt == 0 else _request_merge(run, sources, gate_attempt)
        attempt, sent, score_m = await _attempt(run, sources, merge, gate_attempt)
        requests += sent
        if isinstance(score_m, EndpointError) or (score_m is not None and not score_m.available):
            return _failed(_score_problem("merged", score_m), scores, requests, attempt.merged)
        incomplete += score_m is not None and not score_m.complete
        attempts.append(attempt)
        if attempt.scores:
            decisions.append(decide(attempt.scores, qualities, run.config.alpha, run.config.min_retention))
            if decisions[-1].accepted:
                break  # the gate said yes: no retry can do better by its measure
    return _outcome(attempts, decisions, qualities, requests, incomplete)


async def _with_complexity(scorer: QualityScorer, sources: list[dict[str, str]], outcome: MergeOutcome) -> MergeOutcome:
    assert outcome.merged is not None
    scores = await asyncio.gather(*(scorer.score(row) for row in [*sources, outcome.merged]))
    for label, score in zip([*SIDES[: len(sources)], "merged"], scores, strict=True):
        if isinstance(score, EndpointError) or not score.available:
            problem = _score_problem(label, score).replace("scoring", "scoring the complexity of", 1)
            return dataclasses.replace(outcome, status="failed", reason=problem, rejection_cause=None)
    values = tuple(score.value for score in scores)
    return dataclasses.replace(outcome, source_complexities=values[:-1], complexity_merged=values[-1])


async def _attempt(
    run: _Run, sources: list[dict[str, str]], merge: Any, gate_attempt: int
) -> tuple[MergeAttempt, int, QualityScore | EndpointError | None]:
    """One merge, its score and its sources' retention; a merge that failed is recorded with its reason."""
    seed = merge_params(run.config, 0, gate_attempt)["seed"]
    try:
        merged, sent, completed_at = await merge
    except EndpointConfigError:
        raise  # the key, model or URL is wrong: every pair would fail the same way, so the run stops
    except (MergeParseError, EndpointError) as exc:
        kind = "unparseable merge" if isinstance(exc, MergeParseError) else "endpoint error"
        return MergeAttempt(seed, error=f"{kind}: {exc}"), run.config.parse_retries + 1, None
    measured = _retentions(run, sources, merged) if run.config.compute_retention else _no_retentions()
    score_m, retentions = await asyncio.gather(run.scorer.score(merged), measured)
    if not isinstance(score_m, QualityScore) or not score_m.available:
        return MergeAttempt(seed, merged, completed_at=completed_at), sent, score_m
    scores = AttemptScores(score_m.value, tuple(r.value for r in retentions), tuple(tuple(r.lost) for r in retentions))
    return MergeAttempt(seed, merged, scores, completed_at), sent, score_m


async def _no_retentions() -> list:
    return []


async def _retentions(run: _Run, sources: list[dict[str, str]], merged: dict[str, str]) -> list:
    chunks = merged_chunks(merged)
    vectors = await run.embeddings.encode([row_text(s) for s in sources] + chunks)
    return source_retentions(tuple(sources), merged, vectors[: len(sources)], vectors[len(sources) :])


def _outcome(
    attempts: list[MergeAttempt],
    decisions: list[GateDecision],
    qualities: tuple[float, ...],
    requests: int,
    incomplete: int,
) -> MergeOutcome:
    scored = [attempt for attempt in attempts if attempt.scores is not None]
    if not scored:
        errors = "; ".join(attempt.error for attempt in attempts)
        return MergeOutcome(
            "failed", errors, source_qualities=qualities, attempts=requests, gate_attempts=tuple(attempts)
        )
    index, decision = choose([a.scores for a in scored], decisions)
    kept = scored[index]
    assert kept.scores is not None
    return MergeOutcome(
        "accepted" if decision.accepted else "rejected",
        decision.reason,
        kept.merged,
        kept.scores.quality_merged,
        qualities,
        retentions=kept.scores.retentions,
        rejection_cause=decision.cause,
        attempts=requests,
        gate_attempts=tuple(attempts),
        scores_incomplete=incomplete,
        completed_at=kept.completed_at,
    )


def _score_problem(label: str, score: QualityScore | EndpointError | None) -> str:
    if isinstance(score, EndpointError):
        return f"endpoint error: scoring {label}: {score}"
    if score is not None and not score.available:
        return f"quality score unavailable: no digit 1-6 among the top logprobs for {label}"
    return ""


def _failed(reason: str, scores: Sequence[Any], attempts: int, merged: dict | None = None) -> MergeOutcome:
    qualities = tuple(s.value if isinstance(s, QualityScore) else None for s in scores)
    return MergeOutcome("failed", reason, merged, None, qualities, attempts=attempts)


async def _request_merge(
    run: _Run, sources: list[dict[str, str]], gate_attempt: int
) -> tuple[dict[str, str], int, str]:
    messages = merge_messages(run.merge_template, sources)
    problems = []
    for parse_attempt in range(run.config.parse_retries + 1):
        params = merge_params(run.config, parse_attempt, gate_attempt)
        reply, completed_at = await run.scheduler.complete(run.merge_template, messages, params)
        try:
            return parse_merge_output(reply), parse_attempt + 1, completed_at
        except MergeParseError as exc:
            problems.append(f"attempt {parse_attempt + 1}: {exc}")
    raise MergeParseError(f"no valid JSON after {len(problems)} attempts ({'; '.join(problems)})")


def _rows_of(batch: dict[str, list]) -> list[dict[str, Any]]:
    names = list(batch)
    return [dict(zip(names, values, strict=True)) for values in zip(*batch.values(), strict=True)]


#: ``pairs.map(mergeit_hf.merge_batch, batched=True)``: ``MERGEIT_ENDPOINT`` or the embedded model.
merge_batch = Merger()
