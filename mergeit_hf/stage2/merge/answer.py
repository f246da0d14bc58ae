"""What a merge request must answer: one JSON object with the merged instruction, input and output."""

from __future__ import annotations

import json
from typing import Any

from mergeit_hf.endpoints.base import ChatReply
from mergeit_hf.errors import MergeItError

MERGE_FIELDS = ("instruction", "input", "output")
MERGE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {name: {"type": "string"} for name in MERGE_FIELDS},
    "required": list(MERGE_FIELDS),
    "additionalProperties": False,
}


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
