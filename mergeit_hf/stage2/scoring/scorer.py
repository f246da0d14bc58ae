"""Quality scores through the scheduler: Deita's prompt, the digit logprobs, and missing-digit accounting."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from mergeit_hf.config import MergeItConfig
from mergeit_hf.embeddings.embedder import join_text
from mergeit_hf.endpoints.sending.scheduler import RequestScheduler
from mergeit_hf.errors import AnswerPending, EndpointConfigError, EndpointError, QualityScoringError
from mergeit_hf.prompts import PromptTemplate
from mergeit_hf.stage2.scoring.deita import QualityScore, expected_score

#: Too few scores say nothing about a server's top-k cap; the run stops only after this many.
MIN_SCORES_BEFORE_STOPPING = 12


def score_params(config: MergeItConfig) -> dict[str, Any]:
    # temperature 1.0: the logprobs are those of the model itself, with no warping.
    return {
        "max_tokens": 1,
        "temperature": 1.0,
        "seed": config.seed,
        "logprobs": True,
        "top_logprobs": config.top_logprobs,
    }


def score_prompt(template: PromptTemplate, row: dict[str, str]) -> str:
    """Deita's prompt for one row: its instruction and input together, and its output."""
    instruction = join_text((row["instruction"], row.get("input", "")))
    return template.render(instruction=instruction, output=row["output"])


@dataclass
class ScoreCounts:
    """How many scores were computed, and how many lacked digits (``incomplete_fraction`` explains a stop)."""

    scores: int = 0
    incomplete: int = 0
    unavailable: int = 0

    @property
    def incomplete_fraction(self) -> float:
        return self.incomplete / self.scores if self.scores else 0.0


@dataclass
class QualityScorer:
    """Scores rows (instruction / input / output) with a Deita prompt through ``scheduler``.

    raw: send the rendered prompt byte for byte as a raw completion (a scorer endpoint such as the Deita
        scorer, which has no chat template); else as the user turn of a chat completion.
    """

    scheduler: RequestScheduler
    template: PromptTemplate
    config: MergeItConfig
    counts: ScoreCounts
    raw: bool = False
    role: str = "score"  # what its requests count as: score, complexity, prefilter, scorer check

    def with_template(self, template: PromptTemplate, role: str = "complexity") -> QualityScorer:
        """The same scheduler and route with another Deita prompt (complexity), counted apart."""
        return dataclasses.replace(self, template=template, counts=ScoreCounts(), role=role)

    async def score(self, row: dict[str, str]) -> QualityScore | EndpointError:
        """The score, or the endpoint's error (the caller fails that pair with it, never a default score)."""
        content = score_prompt(self.template, row)
        request = content if self.raw else [{"role": "user", "content": content}]
        try:
            reply, _ = await self.scheduler.complete(self.template, request, score_params(self.config), self.role)
        except (EndpointConfigError, AnswerPending):
            raise  # a refused key or model stops the run (not one row's problem); a pending one waits its round
        except EndpointError as exc:
            return exc
        except Exception as exc:  # anything else fails this score only, named, never the run
            return EndpointError(f"unexpected error while scoring: {type(exc).__name__}: {exc}")
        score = expected_score(reply.first_top_logprobs)
        self._count(score)
        return score

    def _count(self, score: QualityScore) -> None:
        counts, config = self.counts, self.config
        counts.scores += 1
        counts.incomplete += not score.complete
        counts.unavailable += not score.available
        if (
            counts.scores >= MIN_SCORES_BEFORE_STOPPING
            and counts.incomplete_fraction > config.max_missing_score_fraction
        ):
            raise QualityScoringError(
                f"{counts.incomplete} of {counts.scores} quality scores lacked some of the digits 1-6 among the "
                f"top {config.top_logprobs} logprobs ({counts.incomplete_fraction:.0%} > "
                f"max_missing_score_fraction={config.max_missing_score_fraction}). Use a Deita scorer model, raise "
                "top_logprobs (TGI: launch with a higher --max-top-n-tokens), or raise the threshold."
            )
