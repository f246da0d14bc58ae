"""Stage 2: an LLM merges each pair into one example; the gate keeps merges that are better and complete.

``pairs.map(mergeit_hf.merge_batch, batched=True)`` (or unbatched) adds the merged fields, the quality
scores, each source's retention, the gate's decision and the provenance of the merge. ``Merger(...)``
builds a configured callable of the same kind. Requests run concurrently under a bound and are cached
(``endpoints.sending.scheduler``); a request's parameters come from ``request``, answers are parsed by
``answer``; one pair's path (scores, retention, judge, the gate) is ``pair``; what the session holds is
``session``; results are ``results`` and the columns ``columns``. Each pair ends accepted, rejected or failed with a
reason.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import AsyncIterator, Callable, Iterable, Sized
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from tqdm.auto import tqdm

from mergeit_hf.config import MergeItConfig
from mergeit_hf.endpoints.base import ChatBackend, TokenUsage
from mergeit_hf.endpoints.connect import EndpointSettings, open_chat_backend, open_completion_backend
from mergeit_hf.endpoints.sending.collect import BatchCollector
from mergeit_hf.endpoints.sending.ledger import RequestLedger
from mergeit_hf.endpoints.sending.limit import MAX_LIMIT, EndpointLoad
from mergeit_hf.endpoints.sending.request_cache import RequestCache, default_cache_dir
from mergeit_hf.endpoints.sending.scheduler import RequestScheduler, current_usage
from mergeit_hf.endpoints.sending.senders import Senders
from mergeit_hf.endpoints.sending.shared_cache import SharedRequestCache
from mergeit_hf.endpoints.sending.sync import run_sync
from mergeit_hf.endpoints.sending.window import map_windowed
from mergeit_hf.endpoints.servers.completions import CompletionEndpointBackend
from mergeit_hf.errors import AnswerPending, TemplateError
from mergeit_hf.inputs.batches import batch_rows
from mergeit_hf.prompts import PromptTemplate
from mergeit_hf.stage2.merge.columns import outcome_columns, typed_for_map
from mergeit_hf.stage2.merge.pair import PairRun, merge_one, with_complexity
from mergeit_hf.stage2.merge.process_session import ProcessSession
from mergeit_hf.stage2.merge.request import merge_sources
from mergeit_hf.stage2.merge.results import MergeBatch, MergeOutcome, MergeStats
from mergeit_hf.stage2.merge.session import Session, complexity_scorer, retention_embeddings
from mergeit_hf.stage2.scoring.judge import Judge
from mergeit_hf.stage2.scoring.scorer import QualityScorer, ScoreCounts

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
    share_fixed_limit: a fixed limit (announced by the server, or ``concurrency``) is split among the
        processes of this machine sending to the same endpoint at once (``num_proc`` workers, runs side by
        side; counted beside the request cache). The Ray engine gives each actor its share and turns it off.
    shared_cache: the request cache is one append-only file per process (``SharedRequestCache``), safe for
        many processes on many nodes over a network filesystem; the Ray engine turns it on. Else SQLite.
    The key is read when requests are sent, from ``MERGEIT_API_KEY`` (the scorer: ``MERGEIT_SCORER_API_KEY``),
    else ``HF_TOKEN`` or the HF login; it is never stored, logged or recorded.
    """

    endpoint: str | None = None
    config: MergeItConfig = field(default_factory=MergeItConfig)
    cache_dir: str | None = None
    use_cache: bool = True
    show_progress: bool = False
    share_fixed_limit: bool = True
    shared_cache: bool = False
    #: A batch round's collector (``run.batch_rounds``): uncached requests are collected, not sent.
    collector: BatchCollector | None = field(default=None, compare=False, repr=False)
    #: What this merger's sessions sent (by role, retried, throttled); not part of what ``map`` fingerprints.
    ledger: RequestLedger = field(default_factory=RequestLedger, compare=False, repr=False)

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
        state = {name: value for name, value in self.__dict__.items() if name not in ("ledger", "collector")}
        return {**state, "_resolved": resolved}

    def __setstate__(self, state: dict[str, Any]) -> None:
        object.__setattr__(self, "ledger", RequestLedger())  # a copy (a map worker) counts its own
        for name, value in state.items():
            if name != "_resolved":
                object.__setattr__(self, name, value)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A ``map`` batch (or row) merged through this process's open session (``process_session``)."""
        pairs, batched, templates = self._batch(batch)
        merged = ProcessSession.of(self).run(lambda session: self.merge_with(session, pairs, templates))
        return self._columns(merged, batched, templates)

    def merge(self, pairs: Iterable[dict[str, Any]]) -> MergeBatch:
        """Pairs rows (dicts) merged through this process's open session: the outcomes, in order."""
        templates = self.templates()
        return ProcessSession.of(self).run(lambda session: self.merge_with(session, list(pairs), templates))

    async def amerge(self, batch: dict[str, Any]) -> dict[str, Any]:
        """``__call__`` as a coroutine: ``pairs.map(merger.amerge)`` (unbatched) lets ``datasets`` run up to
        1000 rows at once, where a plain unbatched ``map`` of a function merges one pair after another."""
        pairs, batched, templates = self._batch(batch)
        merged = await ProcessSession.of(self).arun(lambda session: self.merge_with(session, pairs, templates))
        return self._columns(merged, batched, templates)

    def _batch(self, batch: dict[str, Any]) -> tuple[list[dict[str, Any]], bool, tuple[PromptTemplate, PromptTemplate]]:
        batched = isinstance(batch["pair_id"], list)
        return (batch_rows(batch) if batched else [batch]), batched, self.templates()

    def _columns(self, merged: MergeBatch, batched: bool, templates: tuple[PromptTemplate, PromptTemplate]) -> dict:
        columns = outcome_columns(merged.outcomes, self.config, templates, merged.merge_model, merged.quality_model)
        typed = typed_for_map(columns, self.config)
        return typed if batched else {name: values[0] for name, values in typed.items()}

    def check_endpoints(self) -> None:
        """Open every endpoint a run will use (merge, scorer, judge), probing each, and close them again: an
        unreachable server, a refused key or an unknown or ambiguous model stops here, naming the fix."""

        async def opened() -> None:
            async with self.session():
                pass

        run_sync(opened())

    def templates(self) -> tuple[PromptTemplate, PromptTemplate]:
        return stage2_templates(self.config)

    def endpoint_settings(self) -> EndpointSettings:
        """The merge endpoint: a URL, a provider, or neither (the embedded model)."""
        return self._settings(self.resolved_endpoint, self.resolved_model, "MERGEIT_API_KEY", "LLM endpoint")

    def scorer_settings(self) -> EndpointSettings | None:
        """The scorer endpoint of its own, if one is set."""
        url = self.resolved_scorer_endpoint
        return (
            self._settings(url, self.config.scorer_model, "MERGEIT_SCORER_API_KEY", "scorer endpoint") if url else None
        )

    def judge_settings(self) -> EndpointSettings | None:
        """The judge's endpoint of its own, if one is set (else the judge asks the scorer's)."""
        config = self.config
        if not (config.judge and config.judge_endpoint):
            return None
        return self._settings(config.judge_endpoint, config.judge_model, "MERGEIT_JUDGE_API_KEY", "judge endpoint")

    def _settings(self, url: str | None, model: str | None, key_variable: str, role: str) -> EndpointSettings:
        config = self.config
        return EndpointSettings(
            url=url,
            model=model,
            # Providers route merges only; the scorer and the judge are URLs of their own when set.
            provider=config.provider if role == "LLM endpoint" else None,
            key_variable=key_variable,
            role=role,
            timeout_s=config.request_timeout_s,
            attempts=config.request_retries,
        )

    def open_cache(self) -> RequestCache:
        folder = (self.cache_dir or default_cache_dir()) if self.use_cache else None
        return SharedRequestCache(folder) if self.shared_cache else RequestCache(folder)

    async def open_scheduler(
        self,
        backend: ChatBackend | CompletionEndpointBackend,
        cache: RequestCache,
        loads: dict[str, EndpointLoad],
        closing: list[Any],
        concurrency: int | None = None,
    ) -> RequestScheduler:
        """Bind an opened backend to the cache and to its endpoint's limit (one per endpoint: a scorer on the
        merge endpoint's URL shares it). ``concurrency`` fixes the limit; else the server's announced size
        fixes it, or the limit adapts from where the probe left it. What must close with the session (the
        endpoint's place among this machine's senders) is added to ``closing``."""
        key = getattr(backend, "url", None) or f"{backend.describe()['kind']}:{backend.model_id}"
        if key not in loads:
            fixed = bool(concurrency) or backend.concurrency_announced
            start = concurrency or backend.default_concurrency
            loads[key] = EndpointLoad(backend.describe()["kind"], limit=start, fixed=fixed)
            if self.share_fixed_limit and fixed and cache.folder is not None and key.startswith("http"):
                senders = Senders(cache.folder, key)  # other processes sending here split the fixed limit
                loads[key].count_senders = senders.count
                closing.append(senders)
        load = loads[key]
        observe = getattr(backend, "observe", None)
        if observe is not None:
            observe(load)
        size_pool = getattr(backend, "size_pool", None)
        if size_pool is not None:
            await size_pool(load.current if load.fixed else MAX_LIMIT)
        start_form = getattr(backend, "start_form", None)
        if self.collector is not None and self.collector.structured_output and start_form is not None:
            start_form(self.collector.structured_output)
        return RequestScheduler(backend, cache, load, collect=self.collector)

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
        loads: dict[str, EndpointLoad] = {}
        try:
            merges = None
            if merging or not scorer_settings:
                backends.append(await open_chat_backend(self.endpoint_settings(), self.config.local_model))
                # config.concurrency fixes the merge endpoint's limit; else the server's announced size, or
                # the adaptive limit.
                merges = await self.open_scheduler(backends[-1], cache, loads, backends, self.config.concurrency)
            scoring = merges
            if scorer_settings:
                backends.append(await open_completion_backend(scorer_settings))
                scoring = await self.open_scheduler(backends[-1], cache, loads, backends)
            assert scoring is not None
            template = quality_template or self.templates()[1]
            scorer = QualityScorer(
                scoring, template, self.config, counts or ScoreCounts(), raw=scorer_settings is not None
            )
            judge = await self._open_judge(scorer, cache, backends, loads) if merging and self.config.judge else None
            yield Session(cache, merges, scorer, judge, loads)
        finally:
            # Backends first: an answer still arriving while they close is stored before the cache shuts.
            for backend in backends:
                await backend.aclose()
            cache.close()
            for load in loads.values():
                self.ledger.add(load)

    async def _open_judge(
        self, scorer: QualityScorer, cache: RequestCache, backends: list[Any], loads: dict[str, EndpointLoad]
    ) -> Judge:
        template = PromptTemplate.load(self.config.judge_template)
        settings = self.judge_settings()
        if settings is None:  # the scorer's model judges, by the scorer's route
            return Judge(scorer.scheduler, template, self.config, raw=scorer.raw)
        backends.append(await open_chat_backend(settings, None))
        scheduler = await self.open_scheduler(backends[-1], cache, loads, backends)
        return Judge(scheduler, template, self.config)

    async def merge_pairs(
        self,
        pairs: Iterable[dict[str, Any]],
        templates: tuple[PromptTemplate, PromptTemplate] | None = None,
        window: int | Literal["auto"] | None = None,
        total: int | None = None,
    ) -> MergeBatch:
        """Merge, score and gate every pair concurrently; outcomes in input order.

        window: pairs in flight at once, taken from ``pairs`` as earlier ones finish, so a long stream keeps
            the server's slots busy without a gap between batches; "auto" is 4 × the endpoint's limit, read
            again as the limit moves (a pair's requests are partly sequential); None starts every pair at
            once (a ``map`` batch).
        """
        merge_template, quality_template = templates or self.templates()
        async with self.session(quality_template, ScoreCounts()) as session:
            return await self.merge_with(session, pairs, (merge_template, quality_template), window, total)

    async def merge_with(
        self,
        session: Session,
        pairs: Iterable[dict[str, Any]],
        templates: tuple[PromptTemplate, PromptTemplate],
        window: int | Literal["auto"] | None = None,
        total: int | None = None,
    ) -> MergeBatch:
        """``merge_pairs`` in a session already open (one kept across ``map`` batches)."""
        config = self.config
        assert session.merges is not None
        if session.retention is None:  # loaded once per session, before the first request of its first batch
            session.retention = retention_embeddings(config)
        run = PairRun(
            session.merges,
            session.scorer,
            templates[0],
            session.retention,
            config,
            complexity_scorer(session),
            session.judge,
        )
        merges = session.merges
        size = (lambda: WINDOW_PER_SLOT * merges.concurrency) if window == "auto" else window
        total = total if total is not None else (len(pairs) if isinstance(pairs, Sized) else None)
        progress = tqdm(total=total, desc="Merging pairs", unit="pair", disable=not self.show_progress)
        outcomes = await _merge_in_order(run, pairs, size, progress)
        progress.close()
        stats = MergeStats(session.requests_sent, session.merges.idle_releases)
        return MergeBatch(list(outcomes), stats, session.merge_model, session.quality_model, session.endpoints())


async def _merge_in_order(
    run: PairRun, pairs: Iterable[dict[str, Any]], window: int | Callable[[], int] | None, progress: Any
) -> list[MergeOutcome]:
    """Every pair's outcome, in order, with up to ``window`` pairs in flight (None: all at once). A
    run-stopping error (a refused key or model, too many missing digits, Ctrl-C) stops every pair still
    running and is raised."""
    everything = sys.maxsize  # a window never full
    return await map_windowed(
        lambda pair: _merge_and_track(run, pair, progress), pairs, everything if window is None else window
    )


async def _merge_and_track(run: PairRun, pair: dict[str, Any], progress: Any) -> MergeOutcome:
    usage = TokenUsage()
    current_usage.set(usage)  # this pair's task (and the requests it starts) count into ``usage``
    sources = merge_sources(pair)
    try:
        outcome = await merge_one(run, sources, pair.get("system") or "")
        if run.complexity is not None and outcome.merged is not None and outcome.status != "failed":
            outcome = await with_complexity(run.complexity, sources, outcome)
    except AnswerPending:  # a batch round: its requests are collected; the pair ends in a later round
        outcome = MergeOutcome("pending", "waiting for the batch's answers")
    if usage.replies:
        outcome = dataclasses.replace(outcome, tokens=(usage.prompt, usage.completion))
    progress.set_postfix_str(f"limit {run.merges.concurrency}", refresh=False)  # the endpoint's limit now
    progress.update(1)
    return outcome


#: ``pairs.map(mergeit_hf.merge_batch, batched=True)``: the default config (the paper's α, the shipped
#: templates, retention on), against ``MERGEIT_ENDPOINT`` (``MERGEIT_MODEL``, ``MERGEIT_SCORER_ENDPOINT`` and
#: the key variables read at call time), else the embedded model. With a config of your own:
#: ``pairs.map(Merger(config=config), batched=True)``.
merge_batch = Merger()
