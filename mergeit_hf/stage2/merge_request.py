"""What a merge request asks the server for: generation parameters, a new seed for every retry."""

from __future__ import annotations

from typing import Any

from mergeit_hf.config import MergeItConfig
from mergeit_hf.endpoints.base import json_response_format
from mergeit_hf.stage2.merge_output import MERGE_SCHEMA

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
        "response_format": json_response_format(MERGE_SCHEMA),
    }
    if config.top_p < 1.0:  # TGI rejects top_p=1.0; leaving it out means the same thing
        params["top_p"] = config.top_p
    return params
