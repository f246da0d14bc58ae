"""The judge: an LLM asked whether a merge answers everything it asks, consistently with its sources.

Retention is lexical and cannot read meaning: a merge that swaps two people's names or restates a
quantity with its owner changed keeps every name, number and word. The judge (``judge: true``) reads the
sources and the merge (``prompts/judge.jinja``) and is read from the first generated token's logprobs:
P(yes) = p(Yes) / (p(Yes) + p(No)), over the casings and spacings of the two words among the top
logprobs, with nothing generated past that token. A reply with neither word among the top logprobs is
an unavailable verdict: the pair fails with that reason rather than getting a default.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from mergeit_hf.config import MergeItConfig
from mergeit_hf.endpoints.sending.scheduler import RequestScheduler
from mergeit_hf.errors import AnswerPending, EndpointConfigError, EndpointError
from mergeit_hf.prompts import PromptTemplate
from mergeit_hf.stage2.scoring.scorer import score_params

YES, NO = "yes", "no"


@dataclass(frozen=True)
class JudgeVerdict:
    """P(yes) (None when neither word was among the top logprobs) and the mass the two words held."""

    p_yes: float | None
    mass: float

    @property
    def available(self) -> bool:
        return self.p_yes is not None


def read_verdict(top_logprobs: Iterable[tuple[str, float]]) -> JudgeVerdict:
    """P(yes) from the first token's top logprobs; "Yes", " yes" and "YES" all count as yes (the best one)."""
    best: dict[str, float] = {}
    for token, logprob in top_logprobs:
        word = token.strip().lower()
        if word in (YES, NO) and logprob > best.get(word, -math.inf):
            best[word] = logprob
    if not best:
        return JudgeVerdict(None, 0.0)
    p = {word: math.exp(logprob) for word, logprob in best.items()}
    mass = sum(p.values())
    return JudgeVerdict(p.get(YES, 0.0) / mass, mass)


@dataclass
class Judge:
    """Asks ``scheduler`` for verdicts with ``template``; ``raw`` sends the rendered prompt as a raw completion."""

    scheduler: RequestScheduler
    template: PromptTemplate
    config: MergeItConfig
    raw: bool = False

    def describe(self) -> dict[str, str]:
        return {**self.scheduler.backend.describe(), "template": self.template.name}

    async def judge(self, sources: Sequence[dict[str, str]], merged: dict[str, str]) -> JudgeVerdict | EndpointError:
        """The verdict, or the endpoint's error (the caller fails that pair with it)."""
        content = self.template.render(sources=list(sources), merged=merged)
        request = content if self.raw else [{"role": "user", "content": content}]
        try:  # one token at temperature 1, as a quality score: the model's own probabilities
            reply, _ = await self.scheduler.complete(self.template, request, score_params(self.config), "judge")
        except (EndpointConfigError, AnswerPending):
            raise
        except EndpointError as exc:
            return exc
        except Exception as exc:  # anything else fails this verdict only, named, never the run
            return EndpointError(f"unexpected error while judging: {type(exc).__name__}: {exc}")
        return read_verdict(reply.first_top_logprobs)
