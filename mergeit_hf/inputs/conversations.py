"""Conversations as rows: OpenAI's and TRL's ``messages`` (``role`` / ``content``) and ShareGPT's
``conversations`` (``from`` / ``value``).

One conversation is one row. It keeps its system prompt and every turn, roles normalised to system / user /
assistant (ShareGPT's human / gpt become user / assistant), contents exactly as they came. Stage 1 reads
its first user turn as the instruction and the first answer as the output: the first request sets a
conversation's topic, and later turns ("now make it shorter") mean nothing alone. A conversation with one
user turn may be merged; one with several is selected or not, whole, and never merged.

A conversation that is not a list of turns, has a turn of an unknown role or with empty or non-text
content, two turns of one side in a row, a system turn anywhere but first, or does not end with an answer
is dropped with its reason.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

#: Each shape's field names and role names, mapped to the normalised roles.
MESSAGES_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
}


@dataclass(frozen=True)
class Shape:
    """How one format spells a turn."""

    name: str
    role_key: str
    content_key: str
    roles: Mapping[str, str]


MESSAGES = Shape("messages", "role", "content", MESSAGES_ROLES)
SHAREGPT = Shape("sharegpt", "from", "value", SHAREGPT_ROLES)


class BadConversation(ValueError):
    """Why a conversation cannot be a row: ``reason`` is the counted category, the message the detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = f"bad conversation: {reason}"
        self.detail = detail


@dataclass(frozen=True)
class Conversation:
    """A valid conversation, normalised."""

    turns: tuple[dict[str, str], ...]  # {"role", "content"}, the system prompt first if there is one

    @property
    def system(self) -> str:
        return self.turns[0]["content"] if self.turns[0]["role"] == "system" else ""

    @property
    def exchanges(self) -> list[dict[str, str]]:
        return [turn for turn in self.turns if turn["role"] != "system"]

    @property
    def user_turns(self) -> int:
        return sum(turn["role"] == "user" for turn in self.turns)

    def row_values(self) -> dict[str, Any]:
        exchanges = self.exchanges
        return {
            "instruction": exchanges[0]["content"],
            "input": "",
            "output": exchanges[1]["content"],
            "system": self.system,
            "messages": list(self.turns),
            "multi_turn": self.user_turns > 1,
        }


def read_conversation(value: Any, shape: Shape) -> Conversation:
    """The conversation ``value`` holds, or ``BadConversation`` naming its first problem."""
    if not isinstance(value, list) or not value:
        kind = "an empty list" if isinstance(value, list) else f"a {type(value).__name__}"
        raise BadConversation("not a list of turns", f"{shape.name} holds {kind}, not a list of turns")
    turns = tuple(
        _turn(turn, number, shape)
        for number, turn in enumerate(value)
        if not _empty_system(turn, shape)  # ShareGPT exports often carry one: it is no system prompt
    )
    if not turns:
        raise BadConversation("not a list of turns", f"{shape.name} holds only an empty system prompt")
    _check_order(turns)
    return Conversation(turns)


def _empty_system(turn: Any, shape: Shape) -> bool:
    return (
        isinstance(turn, Mapping)
        and str(turn.get(shape.role_key, "")).lower() == "system"
        and isinstance(turn.get(shape.content_key), str)
        and not turn[shape.content_key].strip()
    )


def _turn(turn: Any, number: int, shape: Shape) -> dict[str, str]:
    if not isinstance(turn, Mapping) or shape.role_key not in turn or shape.content_key not in turn:
        raise BadConversation(
            f"turn not a {{{shape.role_key}, {shape.content_key}}} object",
            f"turn {number} is {str(turn)[:60]!r}, not a {{{shape.role_key}, {shape.content_key}}} object",
        )
    role = str(turn[shape.role_key]).lower()
    if role not in shape.roles:
        raise BadConversation(
            "unknown role", f"turn {number} has the role {turn[shape.role_key]!r}; known: {sorted(shape.roles)}"
        )
    content = turn[shape.content_key]
    if not isinstance(content, str):
        raise BadConversation("content not text", f"turn {number} holds {type(content).__name__}, not text")
    if not content.strip():
        raise BadConversation("empty content", f"turn {number} ({role}) is empty")
    return {"role": shape.roles[role], "content": content}


def _check_order(turns: tuple[dict[str, str], ...]) -> None:
    roles = [turn["role"] for turn in turns]
    for number, role in enumerate(roles):
        if role == "system" and number > 0:
            raise BadConversation("system turn not first", f"turn {number} is a system turn after the first turn")
    exchanges = roles[1:] if roles[0] == "system" else roles
    if not exchanges or exchanges[0] != "user":
        raise BadConversation(
            "does not start with a user turn", "the first turn after the system prompt is not a user turn"
        )
    for number in range(1, len(exchanges)):
        if exchanges[number] == exchanges[number - 1]:
            offset = len(roles) - len(exchanges)
            raise BadConversation(
                f"two {exchanges[number]} turns in a row",
                f"turns {number - 1 + offset} and {number + offset} are both {exchanges[number]} turns",
            )
    if exchanges[-1] != "assistant":
        raise BadConversation("does not end with an assistant turn", f"the last turn ({len(roles) - 1}) is a user turn")


def conversation_candidates(
    records: Iterable[Mapping[str, Any]], column: str, shape: Shape, id_column: str, dropped: Any
) -> Iterator[tuple[int, str | None, dict[str, Any]]]:
    """(record index, given id, row values) of every valid conversation; each bad one goes to ``dropped``
    (a callable taking index, reason, detail and id) instead."""
    for index, record in enumerate(records):
        given = record.get(id_column)
        given_id = None if given is None else str(given)
        try:
            conversation = read_conversation(record.get(column), shape)
        except BadConversation as bad:
            dropped(index, bad.reason, bad.detail, given_id)
            continue
        yield index, given_id, conversation.row_values()
