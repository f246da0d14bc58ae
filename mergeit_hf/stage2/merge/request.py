"""What a merge request asks the server for: the prompt of a pair's sources, and generation parameters with
a new seed for every retry."""

from __future__ import annotations

from typing import Any

from mergeit_hf.config import MergeItConfig
from mergeit_hf.endpoints.structured_output import json_schema_format
from mergeit_hf.prompts import PromptTemplate
from mergeit_hf.stage1.pairs import group_sources
from mergeit_hf.stage2.merge.answer import MERGE_FIELDS, MERGE_SCHEMA

#: A gate retry at temperature 0 would return the same merge; retries then sample at this temperature.
GATE_RETRY_TEMPERATURE = 0.7


def merge_params(config: MergeItConfig, parse_attempt: int, gate_attempt: int = 0) -> dict[str, Any]:
    """Generation parameters of a merge request; every retry (parse or gate) gets a new seed."""
    temperature = config.temperature
    if gate_attempt and temperature == 0:
        temperature = GATE_RETRY_TEMPERATURE
    params: dict[str, Any] = {
        "max_tokens": config.max_new_tokens,
        "temperature": temperature,
        "seed": config.seed + gate_attempt * (config.parse_retries + 1) + parse_attempt,
        "response_format": json_schema_format(MERGE_SCHEMA, "merge"),
    }
    if config.top_p < 1.0:  # TGI rejects top_p=1.0; leaving it out means the same thing
        params["top_p"] = config.top_p
    return params


def merge_sources(pair: dict[str, Any]) -> list[dict[str, str]]:
    """Every source of one pairs row (a, b, then a group's others) with the fields a merge reads."""
    return [{name: source[name] for name in MERGE_FIELDS} for source in group_sources(pair)]


def merge_messages(template: PromptTemplate, sources: list[dict[str, str]], system: str = "") -> list[dict[str, str]]:
    """The chat messages of a merge request. ``system``: the system prompt every source was answered under
    (the prompt shows it; the merged example keeps it), "" for none."""
    # a and b stay for templates written for pairs; ``sources`` holds every member of a group.
    content = template.render(sources=sources, a=sources[0], b=sources[1], system=system)
    return [{"role": "user", "content": content}]
