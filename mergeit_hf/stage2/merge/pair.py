"""One pair (or group) through stage 2: its sources scored, merges requested, each merge scored, measured
for retention and judged, and the gate's decision over the attempts.

Every request goes through the session's schedulers (concurrency bound, request cache); what a merge is
asked with comes from ``request``, its answer is parsed by ``answer``, the decision is
``gate.decide``. An endpoint error fails the pair with its reason; a refused key or model stops the run.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from mergeit_hf.config import MergeItConfig
from mergeit_hf.embeddings.batcher import EmbeddingBatcher
from mergeit_hf.endpoints.sending.limit import FINISHING, LEAF, request_priority
from mergeit_hf.endpoints.sending.scheduler import RequestScheduler, read_outcome
from mergeit_hf.errors import AnswerPending, EndpointConfigError, EndpointError, QualityScoringError
from mergeit_hf.prompts import PromptTemplate
from mergeit_hf.stage2.gate import SIDES, AttemptScores, GateDecision, choose, decide
from mergeit_hf.stage2.merge.answer import MergeParseError, parse_merge_output
from mergeit_hf.stage2.merge.request import merge_messages, merge_params
from mergeit_hf.stage2.merge.results import MergeAttempt, MergeOutcome
from mergeit_hf.stage2.retention.measure import RetentionTexts, SourceRetention
from mergeit_hf.stage2.scoring.deita import QualityScore
from mergeit_hf.stage2.scoring.judge import Judge, JudgeVerdict
from mergeit_hf.stage2.scoring.scorer import QualityScorer


@dataclass
class PairRun:
    """What every pair of one call shares: the schedulers, the templates, the embedder and the counts."""

    merges: RequestScheduler
    scorer: QualityScorer
    merge_template: PromptTemplate
    embeddings: EmbeddingBatcher | None  # None: compute_retention off
    config: MergeItConfig
    complexity: QualityScorer | None = None  # Deita's complexity prompt, with ``complexity_scores``
    judge: Judge | None = None  # with ``judge``

    @property
    def min_judge(self) -> float | None:
        return self.config.min_judge if self.judge is not None else None

    def decide(self, scores: AttemptScores, qualities: Sequence[float]) -> GateDecision:
        return decide(scores, qualities, self.config.alpha, self.config.min_retention, self.min_judge)


def abandon(task: asyncio.Future) -> None:
    """Stop a request no longer wanted, and read its outcome whenever it ends (no unread exception)."""
    task.cancel()
    task.add_done_callback(read_outcome)


T = TypeVar("T")


async def _at(priority: int, work: Awaitable[T]) -> T:
    """``work`` with its requests admitted at ``priority`` (``limit.request_priority``). Under ``gather``
    this runs in a task of its own, whose context the setting does not leave."""
    request_priority.set(priority)
    return await work


async def gather_all(*works: Awaitable[Any]) -> list[Any]:
    """``asyncio.gather``, except that an ``AnswerPending`` (a batch round) is raised only once every work has
    ended, so each of them collects its request; any other error is raised at once, as ``gather`` does."""
    pending: list[AnswerPending] = []

    async def settled(work: Awaitable[Any]) -> Any:
        try:
            return await work
        except AnswerPending as exc:
            pending.append(exc)
            return None

    results = await asyncio.gather(*(settled(work) for work in works))
    if pending:
        raise pending[0]
    return results


async def merge_one(run: PairRun, sources: list[dict[str, str]], system: str = "") -> MergeOutcome:
    """The pair's outcome. A refused key or model, or too many scores without digits, stops the run (every
    pair would fail alike); anything else that goes wrong fails this pair only, keeping the attempts made.
    In a batch round, a pair needing an answer not yet in the cache raises ``AnswerPending``."""
    attempts: list[MergeAttempt] = []
    try:
        return await _merge(run, sources, attempts, system)
    except (EndpointConfigError, QualityScoringError, AnswerPending):
        raise
    except Exception as exc:  # a bug or a library's surprise in one pair must not cancel the others
        reason = f"unexpected error: {type(exc).__name__}: {exc}"
        return MergeOutcome("failed", reason, gate_attempts=tuple(attempts))


async def _merge(
    run: PairRun, sources: list[dict[str, str]], attempts: list[MergeAttempt], system: str
) -> MergeOutcome:
    first_merge = asyncio.ensure_future(_request_merge(run, sources, 0, system))
    try:
        scores = await gather_all(*(_at(LEAF, run.scorer.score(source)) for source in sources))
    except AnswerPending:
        # The merge goes into the same round's batch as the scores: let it collect its request.
        await asyncio.gather(first_merge, return_exceptions=True)
        raise
    except BaseException:
        abandon(first_merge)
        raise
    for side, score in zip(SIDES, scores, strict=False):
        problem = _score_problem(side, score)
        if problem:
            abandon(first_merge)
            return _failed(problem, scores, 0)
    qualities = tuple(score.value for score in scores)
    decisions: list[GateDecision] = []  # one per scored attempt, each decided once
    incomplete = sum(not s.complete for s in scores)
    requests = 0
    for gate_attempt in range(run.config.gate_retries + 1):
        # A re-merge finishes a pair under way: it goes before new pairs' merges (in a task of its own context)
        retry = _request_merge(run, sources, gate_attempt, system) if gate_attempt else None
        merge = first_merge if retry is None else asyncio.ensure_future(_at(FINISHING, retry))
        attempt, sent, problem, score_m = await _attempt(run, sources, merge, gate_attempt)
        requests += sent
        if problem:
            # Kept in the log with its reason; earlier scored attempts still stand for the gate (and regate).
            attempts.append(dataclasses.replace(attempt, error=problem))
            break
        incomplete += score_m is not None and not score_m.complete
        attempts.append(attempt)
        if attempt.scores:
            decisions.append(run.decide(attempt.scores, qualities))
            if decisions[-1].accepted:
                break  # the gate said yes: no retry can do better by its measure
    return _outcome(attempts, decisions, qualities, requests, incomplete)


async def with_complexity(scorer: QualityScorer, sources: list[dict[str, str]], outcome: MergeOutcome) -> MergeOutcome:
    """Deita's complexity of the sources and the merge, for information: a complexity that cannot be scored
    leaves the columns empty and says so in the reason; the gate's decision stands."""
    assert outcome.merged is not None
    scores = await gather_all(*(_at(FINISHING, scorer.score(row)) for row in [*sources, outcome.merged]))
    for label, score in zip([*SIDES[: len(sources)], "merged"], scores, strict=True):
        problem = _score_problem(label, score, "complexity")
        if problem:
            return dataclasses.replace(outcome, reason=f"{outcome.reason}; complexity not recorded: {problem}")
    values = tuple(score.value for score in scores)
    return dataclasses.replace(outcome, source_complexities=values[:-1], complexity_merged=values[-1])


async def _attempt(
    run: PairRun, sources: list[dict[str, str]], merge: Any, gate_attempt: int
) -> tuple[MergeAttempt, int, str, QualityScore | None]:
    """One merge, its score, its sources' retention and the judge's verdict: the attempt, the merge requests
    it took, the problem that fails the pair ("" if none) and the merge's quality score."""
    seed = merge_params(run.config, 0, gate_attempt)["seed"]
    try:
        merged, sent, completed_at = await merge
    except (EndpointConfigError, AnswerPending):
        raise  # the key, model or URL is wrong (every pair would fail the same way); or wait for the batch
    except (MergeParseError, EndpointError) as exc:
        kind = "unparseable merge" if isinstance(exc, MergeParseError) else "endpoint error"
        return MergeAttempt(seed, error=f"{kind}: {exc}"), run.config.parse_retries + 1, "", None
    score_m, retentions, verdict = await gather_all(
        _at(FINISHING, run.scorer.score(merged)),
        _retentions(run, sources, merged),
        _at(FINISHING, _verdict(run, sources, merged)),
    )
    unscored = MergeAttempt(seed, merged, completed_at=completed_at)
    problem = _score_problem("merged", score_m) or _judge_problem(verdict)
    if problem:
        return unscored, sent, problem, None
    assert isinstance(score_m, QualityScore) and not isinstance(verdict, EndpointError)
    scores = AttemptScores(
        score_m.value,
        tuple(r.value for r in retentions),
        tuple(r.lost for r in retentions),
        tuple((r.question.value, r.answer.value) for r in retentions),
        verdict.p_yes if verdict else None,
    )
    return MergeAttempt(seed, merged, scores, completed_at), sent, "", score_m


async def _retentions(run: PairRun, sources: list[dict[str, str]], merged: dict[str, str]) -> list[SourceRetention]:
    if run.embeddings is None:
        return []
    texts = RetentionTexts(tuple(sources), merged)
    vectors = await run.embeddings.encode(texts.all_texts())
    # Salient items and numbers are pure-Python text work: off the event loop, so replies keep being read.
    return await asyncio.to_thread(texts.measure, vectors)


async def _verdict(
    run: PairRun, sources: list[dict[str, str]], merged: dict[str, str]
) -> JudgeVerdict | EndpointError | None:
    return await run.judge.judge(sources, merged) if run.judge is not None else None


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
        merged = next((a.merged for a in reversed(attempts) if a.merged is not None), None)
        return MergeOutcome(
            "failed", errors, merged, source_qualities=qualities, attempts=requests, gate_attempts=tuple(attempts)
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
        retention_parts=kept.scores.parts,
        judge=kept.scores.judge,
        rejection_cause=decision.cause,
        attempts=requests,
        gate_attempts=tuple(attempts),
        scores_incomplete=incomplete,
        completed_at=kept.completed_at,
    )


def _score_problem(label: str, score: QualityScore | EndpointError | None, kind: str = "quality") -> str:
    what = f"the {kind} of {label}" if kind != "quality" else label
    if isinstance(score, EndpointError):
        return f"endpoint error: scoring {what}: {score}"
    if score is not None and not score.available:
        return f"{kind} score unavailable: no digit 1-6 among the top logprobs for {label}"
    return ""


def _judge_problem(verdict: JudgeVerdict | EndpointError | None) -> str:
    if isinstance(verdict, EndpointError):
        return f"endpoint error: judging the merge: {verdict}"
    if verdict is not None and not verdict.available:
        return "judge unavailable: neither yes nor no among the top logprobs of the judge's reply"
    return ""


def _failed(reason: str, scores: Sequence[Any], attempts: int) -> MergeOutcome:
    qualities = tuple(s.value if isinstance(s, QualityScore) else None for s in scores)
    return MergeOutcome("failed", reason, None, None, qualities, attempts=attempts)


async def _request_merge(
    run: PairRun, sources: list[dict[str, str]], gate_attempt: int, system: str = ""
) -> tuple[dict[str, str], int, str]:
    messages = merge_messages(run.merge_template, sources, system)
    problems = []
    for parse_attempt in range(run.config.parse_retries + 1):
        params = merge_params(run.config, parse_attempt, gate_attempt)
        reply, completed_at = await run.merges.complete(run.merge_template, messages, params, "merge")
        try:
            return parse_merge_output(reply), parse_attempt + 1, completed_at
        except MergeParseError as exc:
            problems.append(f"attempt {parse_attempt + 1}: {exc}")
    raise MergeParseError(f"no valid JSON after {len(problems)} attempts ({'; '.join(problems)})")
