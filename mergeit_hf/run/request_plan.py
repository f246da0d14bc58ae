"""What stage 2 would send, sent nowhere: ``mergeit run --dry-run`` prints one merge request as it would go
out and the prompt tokens of every first merge and source score.

Tokens are counted with the embedded model's own tokenizer when no endpoint is given (llama.cpp loads the
GGUF's vocabulary only); for an endpoint the count is an estimate (4 characters a token) and says so. Past
``SAMPLE_GROUPS`` groups, an even sample of them is rendered and counted and the totals scaled (rendering and
tokenizing 100k groups would cost the dry run minutes). The merged rows' own scores, parse and gate retries
and the scorer check are not in the count: their texts do not exist before the run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from datasets import Dataset

from mergeit_hf.config import MergeItConfig
from mergeit_hf.endpoints.servers.local_llama import resolve_local_model
from mergeit_hf.prompts import PromptTemplate
from mergeit_hf.stage2.merge.request import merge_messages, merge_params, merge_sources
from mergeit_hf.stage2.scoring.scorer import score_prompt

CHARACTERS_PER_TOKEN = 4
SAMPLE_GROUPS = 2_000


@dataclass(frozen=True)
class RequestPlan:
    """The first merge request's body, and the prompt tokens of the planned merges and source scores."""

    example: dict[str, Any]
    merges: int
    source_scores: int
    merge_prompt_tokens: int
    score_prompt_tokens: int
    counted_with: str

    def report(self) -> str:
        return (
            f"prompt tokens ({self.counted_with}): {self.merge_prompt_tokens:,} in {self.merges:,} merge requests, "
            f"{self.score_prompt_tokens:,} in {self.source_scores:,} source scores; the merges' own scores, retries "
            "and the scorer check come on top"
        )


def plan_requests(
    groups: Dataset, config: MergeItConfig, model: str | None, count: Callable[[str], int], counted_with: str
) -> RequestPlan:
    """Render every group's merge prompt and every source's Deita prompt as the run would, and count them."""
    merge_template = PromptTemplate.load(config.merge_template)
    quality_template = PromptTemplate.load(config.quality_template)
    merge_tokens = score_tokens = 0
    example: dict[str, Any] = {}
    step = max(1, -(-len(groups) // SAMPLE_GROUPS))  # every group up to the sample size, else every step-th
    sample = groups.select(range(0, len(groups), step))
    for group in sample:
        sources = merge_sources(group)
        messages = merge_messages(merge_template, sources, group.get("system") or "")
        merge_tokens += count(messages[0]["content"])
        score_tokens += sum(count(score_prompt(quality_template, source)) for source in sources)
        if not example:
            example = {"model": model or "(the server's, from its probe)", "messages": messages}
            example |= merge_params(config, 0)
    scale = len(groups) / len(sample) if len(sample) else 0.0
    if step > 1:
        counted_with += f", on {len(sample):,} of {len(groups):,} groups, scaled"
    scores = int(sum(groups["group_size"])) if len(groups) else 0
    return RequestPlan(
        example, len(groups), scores, round(merge_tokens * scale), round(score_tokens * scale), counted_with
    )


def token_counter(endpoint: str | None, config: MergeItConfig) -> tuple[Callable[[str], int], str]:
    """The embedded model's tokenizer where it runs the merges, else an estimate that says so."""
    if endpoint is None and config.provider is None:
        try:
            from llama_cpp import Llama
        except ImportError:
            pass
        else:
            path = resolve_local_model(config.local_model)
            vocabulary = Llama(model_path=str(path), vocab_only=True, verbose=False)
            return lambda text: len(vocabulary.tokenize(text.encode("utf-8"), add_bos=True)), f"{path.name}'s tokenizer"
    return lambda text: -(-len(text) // CHARACTERS_PER_TOKEN), f"estimated at {CHARACTERS_PER_TOKEN} characters a token"
