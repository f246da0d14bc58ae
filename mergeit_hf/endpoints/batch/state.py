"""Where a ``--batch`` run stands, in the output folder (``OUT/batch/state.json``): each round's files and batch
ids, the answers, failed lines and tokens it brought, and the requests that failed too often to send again.

Written (atomically) after every step that creates something at the provider, so a client killed at any point
and started again picks up the batch it was waiting on instead of submitting a second one.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergeit_hf.endpoints.structured_output import JSON_SCHEMA

STATE_FILE = "state.json"


@dataclass
class SubmittedFile:
    """One input file of a round: its local copy, its id at the provider, and the batch over it."""

    name: str  # round-N-part-M.jsonl, beside state.json (its payloads in round-N-part-M.payloads.jsonl)
    requests: int
    input_file_id: str | None = None
    batch_id: str | None = None
    status: str = "not uploaded"
    ingested: bool = False
    refused_batches: list[str] = field(default_factory=list)  # refused for the provider's queue: ran nothing


@dataclass
class RoundRecord:
    """One round: what it sent, and what came back."""

    round: int
    requests: int
    by_role: dict[str, int]
    files: list[SubmittedFile] = field(default_factory=list)
    structured_output: str = JSON_SCHEMA  # the response_format form its lines were written in
    answered: int = 0
    failed_lines: int = 0
    unanswered: int = 0  # in a batch that expired, was cancelled or failed before answering them
    format_refused: int = 0  # lines refused for their response_format form: sent again, a form lower
    queue_refused: int = 0  # batches refused for the provider's enqueued-token limit: created again
    enqueued_token_limit: int | None = None  # the limit its files were split under (batch_enqueued_tokens)
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def done(self) -> bool:
        return all(part.ingested for part in self.files)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoundRecord:
        files = [SubmittedFile(**part) for part in data.pop("files")]
        return cls(**data, files=files)


@dataclass
class BatchState:
    """endpoint: the URL the batches went to (a run against another endpoint starts afresh, keeping nothing).
    attempts: failed lines by request key; given_up: the keys that failed ``request_retries`` times, with the
    last reason. structured_output, format_settled: the response_format form the next round's lines are written
    in, and whether a line in it was answered (from then on a refusal is the line's own failure)."""

    folder: Path
    endpoint: str
    rounds: list[RoundRecord] = field(default_factory=list)
    attempts: dict[str, int] = field(default_factory=dict)
    given_up: dict[str, str] = field(default_factory=dict)
    structured_output: str = JSON_SCHEMA
    format_settled: bool = False

    @property
    def in_flight(self) -> RoundRecord | None:
        """The last round, if its answers are not all in the cache yet."""
        return self.rounds[-1] if self.rounds and not self.rounds[-1].done else None

    @classmethod
    def open(cls, folder: Path, endpoint: str) -> BatchState:
        path = folder / STATE_FILE
        if path.exists():
            data = json.loads(path.read_text())
            if data["endpoint"] == endpoint:
                return cls._of(folder, data)
        folder.mkdir(parents=True, exist_ok=True)
        return cls(folder, endpoint)

    @classmethod
    def read(cls, folder: Path) -> BatchState:
        """The state as a run left it (``mergeit batch-status``)."""
        path = folder / STATE_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: no `mergeit run --batch` wrote to this folder")
        return cls._of(folder, json.loads(path.read_text()))

    @classmethod
    def _of(cls, folder: Path, data: dict[str, Any]) -> BatchState:
        rounds = [RoundRecord.from_dict(r) for r in data["rounds"]]
        form = data.get("structured_output", JSON_SCHEMA)  # a state written before the form was kept
        settled = data.get("format_settled", False)
        return cls(folder, data["endpoint"], rounds, data["attempts"], data["given_up"], form, settled)

    def save(self) -> None:
        data = {
            "endpoint": self.endpoint,
            "rounds": [r.to_dict() for r in self.rounds],
            "attempts": self.attempts,
            "given_up": self.given_up,
            "structured_output": self.structured_output,
            "format_settled": self.format_settled,
        }
        temporary = self.folder / (STATE_FILE + ".tmp")
        temporary.write_text(json.dumps(data, indent=1))
        os.replace(temporary, self.folder / STATE_FILE)  # never half a file, whenever the client is killed

    def summary(self) -> dict[str, Any]:
        """What run.json and the card record: the rounds, requests and tokens sent through the batch API."""
        return {
            "rounds": len(self.rounds),
            "requests": sum(r.requests for r in self.rounds),
            "answered": sum(r.answered for r in self.rounds),
            "failed_lines": sum(r.failed_lines for r in self.rounds),
            "unanswered": sum(r.unanswered for r in self.rounds),
            "format_refused": sum(r.format_refused for r in self.rounds),
            "queue_refused": sum(r.queue_refused for r in self.rounds),
            "enqueued_token_limit": self.rounds[-1].enqueued_token_limit if self.rounds else None,
            "given_up": len(self.given_up),
            "structured_output": self.structured_output,
            "by_round": [
                {
                    "round": r.round,
                    "requests": r.requests,
                    "by_role": r.by_role,
                    "batches": [part.batch_id for part in r.files],
                    "answered": r.answered,
                    "failed_lines": r.failed_lines,
                    "unanswered": r.unanswered,
                    "format_refused": r.format_refused,
                    "queue_refused": r.queue_refused,
                    "enqueued_token_limit": r.enqueued_token_limit,
                    "structured_output": r.structured_output,
                    "prompt_tokens": r.prompt_tokens,
                    "completion_tokens": r.completion_tokens,
                }
                for r in self.rounds
            ],
        }
