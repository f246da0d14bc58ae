"""A scripted OpenAI Batch API: ``/v1/files`` and ``/v1/batches`` as OpenAI documents them, each line answered
by the scripted chat server's own logic (so a batch run and a synchronous run get the same answers).

A batch moves one status per poll (GET ``/v1/batches/{id}``): validating → in_progress → finalizing →
completed, or failed at validation (a line without custom_id, a custom_id twice, another URL or method,
two models), expired. Output lines carry ``response.status_code`` and ``body``; failed lines go to the error
file. Faults for the next batch created: ``expire_next`` (it expires with the first half of its lines
answered), ``fail_next_lines`` (that many of its first lines fail with HTTP 500 in the error file). A model
that takes only some structured-output forms: ``refused_formats`` (lines whose response_format is one of them
fail with OpenAI's HTTP 400 naming the parameter). A queue: ``enqueued_token_limit`` (a batch whose input tokens,
a token per 4 characters of its messages, would take the tokens of the batches not finished above it fails at
validation with OpenAI's ``token_limit_exceeded``; ``queue_peak`` and ``most_batches_queued``: the most tokens
and batches the queue held), and
``refuse_queue_next`` (that many next batches fail so, as when other jobs of the account hold the queue).
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.helpers.scripted import ScriptedServer

STEPS = ("validating", "in_progress", "finalizing", "completed")


@dataclass
class ScriptedBatchServer(ScriptedServer):
    serves_info: bool = False  # an OpenAI-shaped API: no TGI /info
    expire_next: bool = False
    fail_next_lines: int = 0
    refused_formats: frozenset[str] = frozenset()  # "json_schema", "json_object+schema", "json_object"
    enqueued_token_limit: int | None = None
    refuse_queue_next: int = 0
    queue_peak: int = 0
    most_batches_queued: int = 0
    queue_refusals: int = 0
    _queue: dict[str, int] = field(default_factory=dict)  # batch id → its input tokens, while it is not finished
    files: dict[str, bytes] = field(default_factory=dict)
    batches: dict[str, dict[str, Any]] = field(default_factory=dict)
    lines_answered: Counter = field(default_factory=Counter)  # custom_id → times answered (output or error)
    polls: int = 0
    _ids: Any = field(default_factory=itertools.count)
    _faults: dict[str, tuple[bool, int]] = field(default_factory=dict)

    def routes(self, app: web.Application) -> None:
        super().routes(app)
        app.middlewares.append(self._key_check)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/files", self._upload)
        app.router.add_get("/v1/files/{id}/content", self._content)
        app.router.add_post("/v1/batches", self._create)
        app.router.add_get("/v1/batches", self._list)
        app.router.add_get("/v1/batches/{id}", self._get)

    @web.middleware
    async def _key_check(self, request: web.Request, handler):
        """The files and batches routes answer 401 without the key (the chat route checks its own)."""
        batch_route = request.path.startswith(("/v1/files", "/v1/batches"))
        keyed = self.required_key is None or request.headers.get("Authorization") == f"Bearer {self.required_key}"
        if batch_route and not keyed:
            return web.json_response({"error": {"message": "Invalid API key"}}, status=401)
        return await handler(request)

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model_id, "object": "model"}]})

    async def _upload(self, request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("purpose") != "batch":
            return web.json_response({"error": {"message": "purpose must be batch"}}, status=400)
        upload = form["file"]
        content = upload.file.read()
        file_id = f"file-{next(self._ids)}"
        self.files[file_id] = content
        return web.json_response(
            {
                "id": file_id,
                "object": "file",
                "bytes": len(content),
                "filename": upload.filename,
                "purpose": "batch",
                "created_at": 0,
            }
        )

    async def _content(self, request: web.Request) -> web.Response:
        content = self.files.get(request.match_info["id"])
        if content is None:
            return web.json_response({"error": {"message": "No such File object"}}, status=404)
        return web.Response(body=content, content_type="application/octet-stream")

    async def _create(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("input_file_id") not in self.files:
            return web.json_response({"error": {"message": "No such File object"}}, status=400)
        if body.get("endpoint") not in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
            return web.json_response({"error": {"message": "unsupported endpoint"}}, status=400)
        if body.get("completion_window") != "24h":
            return web.json_response({"error": {"message": "completion_window must be 24h"}}, status=400)
        batch_id = f"batch_{next(self._ids)}"
        self.batches[batch_id] = {
            "id": batch_id,
            "object": "batch",
            "endpoint": body["endpoint"],
            "errors": None,
            "input_file_id": body["input_file_id"],
            "completion_window": "24h",
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": 0,
            "metadata": body.get("metadata"),
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
        }
        self._faults[batch_id] = (self.expire_next, self.fail_next_lines)
        self.expire_next, self.fail_next_lines = False, 0
        return web.json_response(self.batches[batch_id])

    async def _list(self, request: web.Request) -> web.Response:
        limit = int(request.query.get("limit", 20))
        newest = list(reversed(self.batches.values()))
        after = request.query.get("after")
        if after:  # the page after the batch with this id (OpenAI's cursor)
            newest = newest[[batch["id"] for batch in newest].index(after) + 1 :]
        return web.json_response({"object": "list", "data": newest[:limit], "has_more": len(newest) > limit})

    async def _get(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return web.json_response({"error": {"message": "No such Batch object"}}, status=404)
        self.polls += 1
        if batch["status"] in STEPS[:-1]:
            self._advance(batch)
        return web.json_response(batch)

    def _advance(self, batch: dict[str, Any]) -> None:
        lines = [json.loads(line) for line in self.files[batch["input_file_id"]].splitlines() if line.strip()]
        if batch["status"] == "validating":
            problem = _invalid(lines, batch["endpoint"]) or self._over_queue(batch["id"], lines)
            if problem:
                batch["status"], batch["errors"] = "failed", {"object": "list", "data": [problem]}
                return
            batch["request_counts"]["total"] = len(lines)
        expire, failing = self._faults[batch["id"]]
        step = STEPS[STEPS.index(batch["status"]) + 1]
        if step == "finalizing" and expire:
            self._finish(batch, lines[: len(lines) // 2], failing, never_run=lines[len(lines) // 2 :])
            batch["status"] = "expired"
            self._queue.pop(batch["id"], None)
            return
        if step == "completed":
            self._finish(batch, lines, failing)
            self._queue.pop(batch["id"], None)
        batch["status"] = step

    def _over_queue(self, batch_id: str, lines: list[dict[str, Any]]) -> dict[str, Any] | None:
        """OpenAI's refusal of a batch the model's queue cannot take; else the batch joins the queue."""
        tokens = sum(len(str(m.get("content", ""))) for line in lines for m in line["body"]["messages"]) // 4
        limit = self.enqueued_token_limit
        refused = self.refuse_queue_next > 0 or (limit is not None and sum(self._queue.values()) + tokens > limit)
        if refused:
            self.refuse_queue_next = max(0, self.refuse_queue_next - 1)
            self.queue_refusals += 1
            message = (
                f"Enqueued token limit reached for {self.model_id} in organization org-test. Limit: {limit or 0:,} "
                "enqueued tokens. Please try again once some in_progress batches have been completed."
            )
            return {"code": "token_limit_exceeded", "message": message, "param": None, "line": None}
        self._queue[batch_id] = tokens
        self.queue_peak = max(self.queue_peak, sum(self._queue.values()))
        self.most_batches_queued = max(self.most_batches_queued, len(self._queue))
        return None

    def _finish(
        self, batch: dict[str, Any], lines: list[dict[str, Any]], failing: int, never_run: Sequence[dict[str, Any]] = ()
    ) -> None:
        output, errors = [], []
        for index, line in enumerate(lines):
            self.lines_answered[line["custom_id"]] += 1
            if index < failing:
                error = {
                    "error": {"message": "The server had an error processing your request", "type": "server_error"}
                }
                errors.append(
                    {
                        "id": f"req_{index}",
                        "custom_id": line["custom_id"],
                        "response": {"status_code": 500, "request_id": f"r{index}", "body": error},
                        "error": None,
                    }
                )
                continue
            try:
                answer = self._format_refusal(line["body"]) or self.answer_body(line["body"])
                status, body = answer.status, json.loads(answer.body)
            except web.HTTPException as exc:
                status, body = exc.status, {"error": {"message": exc.text}}
            entry = {
                "id": f"req_{index}",
                "custom_id": line["custom_id"],
                "response": {"status_code": status, "request_id": f"r{index}", "body": body},
                "error": None,
            }
            (output if status == 200 else errors).append(entry)
        for index, line in enumerate(never_run, start=len(lines)):  # OpenAI lists these in the error file
            message = "This request could not be executed before the completion window expired."
            errors.append(
                {
                    "id": f"req_{index}",
                    "custom_id": line["custom_id"],
                    "response": None,
                    "error": {"code": "batch_expired", "message": message},
                }
            )
        batch["output_file_id"] = self._store(output)
        batch["error_file_id"] = self._store(errors) if errors else None
        batch["request_counts"].update(completed=len(output), failed=len(errors) - len(never_run))

    def _format_refusal(self, body: dict[str, Any]) -> web.Response | None:
        response_format = body.get("response_format")
        if response_format is None:
            return None
        kind = response_format.get("type", "") + ("+schema" if "schema" in response_format else "")
        if kind not in self.refused_formats:
            return None
        self.requests[f"refused {kind}"] += 1
        kind_named = response_format.get("type")
        message = f"Invalid parameter: 'response_format' of type '{kind_named}' is not supported with this model."
        error = {"message": message, "type": "invalid_request_error", "param": "response_format", "code": None}
        return web.json_response({"error": error}, status=400)

    def _store(self, entries: list[dict[str, Any]]) -> str:
        file_id = f"file-{next(self._ids)}"
        self.files[file_id] = "".join(json.dumps(entry) + "\n" for entry in entries).encode()
        return file_id


def _invalid(lines: list[dict[str, Any]], endpoint: str) -> dict[str, Any] | None:
    seen: set[str] = set()
    models = set()
    for number, line in enumerate(lines, start=1):
        custom_id = line.get("custom_id")
        if not custom_id or custom_id in seen:
            return {
                "code": "duplicate_custom_id" if custom_id else "missing_custom_id",
                "line": number,
                "message": "custom_id must be unique and present",
            }
        seen.add(custom_id)
        if line.get("method") != "POST" or line.get("url") != endpoint:
            return {"code": "invalid_url", "line": number, "message": f"url must be {endpoint} with POST"}
        models.add((line.get("body") or {}).get("model"))
    if len(models) > 1:
        return {"code": "mismatched_model", "line": None, "message": "every line must name the same model"}
    return None
