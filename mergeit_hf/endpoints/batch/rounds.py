"""One batch round at the provider: the collected requests written as JSON lines files, uploaded, a batch
created over each, polled with backoff until it ends, and every answer written into the request cache.

Each step is recorded in ``BatchState`` as soon as the provider has acted on it, so ``finish`` resumes a round
a killed client left: it uploads only files with no id, creates a batch only over a file that has none (after
asking the provider whether one was created just before the kill), and polls the rest.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mergeit_hf.endpoints.base import reply_from_chat_completion
from mergeit_hf.endpoints.batch.api import BatchApi, BatchInfo
from mergeit_hf.endpoints.batch.limits import COMPLETION_WINDOW, BatchLimits
from mergeit_hf.endpoints.batch.state import BatchState, RoundRecord, SubmittedFile
from mergeit_hf.endpoints.http.transport import body_message
from mergeit_hf.endpoints.sending.collect import BatchCollector
from mergeit_hf.endpoints.sending.request_cache import RequestCache
from mergeit_hf.endpoints.structured_output import FormatLadder, refuses_format
from mergeit_hf.errors import EndpointConfigError, EndpointError

logger = logging.getLogger(__name__)
NOT_RUN = frozenset({"batch_expired", "batch_cancelled"})  # error-file codes of lines the provider never ran
MAX_POLL_S = 600.0  # polls slow down to one every ten minutes: a batch may take its whole 24 hours
MAX_POLL_FAILURES = 10  # polls failed in a row (each after its retries) before the run stops: about an hour
MAX_QUEUE_REFUSALS = 10  # refused for the enqueued-token limit in a row: 35 min to 2 h at the default poll
CHAT_ROUTE = "/v1/chat/completions"


@dataclass
class BatchRounds:
    """The provider's batch API, the run's batch state, and the request cache answers go into.

    retries: failed lines a request may have before it is given up (``request_retries``).
    poll_s: the first wait between polls; each next one is 1.5 × longer, up to ``MAX_POLL_S``.

    A line refused for its response_format form (as a synchronous request can be: ``FormatLadder``) is not an
    attempt: the state's form steps down one, and the next round writes the line in it.
    """

    api: BatchApi
    state: BatchState
    cache: RequestCache
    retries: int
    poll_s: float = 30.0
    limits: BatchLimits = BatchLimits()  # noqa: RUF009 (frozen, shared safely)
    window: str = COMPLETION_WINDOW
    _formats: FormatLadder = field(init=False)

    def __post_init__(self) -> None:
        self._formats = FormatLadder(
            self.state.endpoint, form=self.state.structured_output, settled=self.state.format_settled
        )

    def submit(self, collector: BatchCollector) -> RoundRecord:
        """Write the round's files beside the state and record the round (nothing is sent yet: ``finish``)."""
        requests = sorted(collector.requests.values(), key=lambda request: request.key)
        number = len(self.state.rounds) + 1
        record = RoundRecord(
            number,
            len(requests),
            collector.by_role(),
            structured_output=collector.structured_output or self._formats.form,
            enqueued_token_limit=self.limits.max_tokens,
        )
        payloads = {request.key: request.payload for request in requests}
        self._write_parts(record, [request.line() for request in requests], payloads)
        self.state.rounds.append(record)
        self.state.save()
        return record

    def _write_parts(self, record: RoundRecord, lines: list[bytes], payloads: dict[str, Any], first: int = 1) -> None:
        """The lines as files within the limits, numbered from ``first``, each with its payloads."""
        for index, part_lines in enumerate(self.limits.split(lines), start=first):
            name = f"round-{record.round}-part-{index}.jsonl"
            (self.state.folder / name).write_bytes(b"".join(part_lines))
            keys = [json.loads(line)["custom_id"] for line in part_lines]
            entries = "".join(json.dumps({"key": key, "payload": payloads[key]}) + "\n" for key in keys)
            (self.state.folder / _payloads_name(name)).write_text(entries)
            record.files.append(SubmittedFile(name, len(part_lines)))

    async def _split_again_if_the_limit_moved(self, record: RoundRecord) -> None:
        """A round resumed under another ``batch_enqueued_tokens`` (its files refused for the queue, say): the
        files the provider has not taken are split again under the limit now set."""
        if record.enqueued_token_limit == self.limits.max_tokens:
            return
        untaken = [p for p in record.files if not p.ingested and not await self._taken(p)]
        lines = [line for p in untaken for line in (self.state.folder / p.name).read_bytes().splitlines(True)]
        payloads = {
            k: v for p in untaken for k, v in _read_payloads(self.state.folder / _payloads_name(p.name)).items()
        }
        after = 1 + max(_part_number(part.name) for part in record.files)  # new names: the old may be listed
        record.files = [p for p in record.files if all(p is not gone for gone in untaken)]
        self._write_parts(record, lines, payloads, first=after)
        record.enqueued_token_limit = self.limits.max_tokens
        self.state.save()
        for part in untaken:  # their lines are in the new files now
            (self.state.folder / part.name).unlink(missing_ok=True)
            (self.state.folder / _payloads_name(part.name)).unlink(missing_ok=True)
        logger.info(
            "batch round %d: %d untaken file(s) split again under batch_enqueued_tokens %s",
            record.round,
            len(untaken),
            self.limits.max_tokens,
        )

    async def _taken(self, part: SubmittedFile) -> bool:
        """Whether the provider has a batch over the part that its queue did not refuse (one a killed run created
        without recording it included)."""
        if part.batch_id is None and part.input_file_id is not None:
            found = await self.api.find(part.input_file_id)
            if found is not None and found.id not in part.refused_batches:
                part.batch_id, part.status = found.id, found.status
        return part.batch_id is not None and part.batch_id not in part.refused_batches

    async def finish(self, record: RoundRecord) -> None:
        """Upload, create, poll and ingest every file of ``record`` not done yet."""
        try:
            await self._split_again_if_the_limit_moved(record)
            await self._finish(record)
        finally:
            await self.api.aclose()  # its connections belong to this event loop

    async def _finish(self, record: RoundRecord) -> None:
        if self.limits.sequential:  # within the enqueued-token limit: the queue holds one file at a time
            for part in record.files:
                if not part.ingested:
                    await self._send(record, part)
                    await self._wait_and_ingest(record, part)
            return
        for part in record.files:
            await self._send(record, part)
        await asyncio.gather(*(self._wait_and_ingest(record, part) for part in record.files if not part.ingested))

    async def _send(self, record: RoundRecord, part: SubmittedFile) -> None:
        """Upload the part's file and create its batch, each once; for a file uploaded before, first look for
        the batch a killed run created just before it could record it (the newest over the file)."""
        fresh = part.input_file_id is None
        if fresh:
            part.input_file_id = await self.api.upload(part.name, (self.state.folder / part.name).read_bytes())
            part.status = "uploaded"
            self.state.save()
        if part.batch_id is None:
            found = None if fresh else await self.api.find(part.input_file_id)
            if found is not None and found.id in part.refused_batches:
                found = None  # the batch the queue refused: a new one is due
            metadata = {"mergeit_round": str(record.round), "file": part.name}
            batch = found or await self.api.create(part.input_file_id, CHAT_ROUTE, self.window, metadata)
            part.batch_id, part.status = batch.id, batch.status
            self.state.save()
            logger.info(
                "batch round %d: %s has %d requests in batch %s", record.round, part.name, part.requests, batch.id
            )

    async def _wait_and_ingest(self, record: RoundRecord, part: SubmittedFile) -> None:
        wait, failures, queue_refusals = self.poll_s, 0, 0
        while True:
            if part.batch_id is None:  # refused for the queue last time: a new batch over the same file
                await self._send(record, part)
            assert part.batch_id is not None
            try:
                batch = await self.api.get(part.batch_id)
            except EndpointConfigError:
                raise  # a key or URL refused: polling again cannot help
            except EndpointError as exc:  # the provider unreachable a while (after retries): the batch runs on there
                failures += 1
                if failures >= MAX_POLL_FAILURES:
                    raise
                logger.warning("batch %s: poll %d failed in a row, polling on (%s)", part.batch_id, failures, exc)
            else:
                failures = 0
                if batch.status != part.status:
                    part.status = batch.status
                    self.state.save()
                if batch.queue_full:
                    queue_refusals += 1
                    self._queue_refused(record, part, batch, queue_refusals)
                elif batch.done:
                    break
            await asyncio.sleep(wait)
            wait = min(MAX_POLL_S, wait * 1.5)
        await self._ingest(record, part, batch)

    def _queue_refused(self, record: RoundRecord, part: SubmittedFile, batch: BatchInfo, refusals: int) -> None:
        """A batch failed for the provider's enqueued-token limit ran nothing: create it again after the wait,
        up to ``MAX_QUEUE_REFUSALS`` times in a row."""
        record.queue_refused += 1
        part.refused_batches.append(batch.id)
        part.batch_id, part.status = None, "refused for the queue: created again after the wait"
        self.state.save()  # a resumed run creates a new batch; it neither waits on nor counts this one again
        advice = (
            "set batch_enqueued_tokens (--batch-enqueued-tokens) to your tier's limit for the model, so each file "
            "stays under it and the files go one at a time"
            if self.limits.max_tokens is None
            else "other batches of yours hold the queue, or batch_enqueued_tokens is above the provider's limit"
        )
        if refusals >= MAX_QUEUE_REFUSALS:
            raise EndpointError(
                f"batch round {record.round}: {part.name} was refused {refusals} times in a row for the provider's "
                f"enqueued-token limit ({batch.errors}); {advice}. The state is kept: the same command resumes the "
                "round (a new batch_enqueued_tokens splits its files not taken yet under it)"
            )
        logger.warning(
            "batch %s refused for the queue (%s); created again after the wait: %s", batch.id, batch.errors, advice
        )

    async def _ingest(self, record: RoundRecord, part: SubmittedFile, batch: BatchInfo) -> None:
        payloads = _read_payloads(self.state.folder / _payloads_name(part.name))
        # Both files are downloaded before anything is counted: other parts save the state while this one
        # awaits, and a count saved before ``ingested`` would be counted again by the run that resumes.
        texts = [await self.api.content(file_id) for file_id in (batch.output_file_id, batch.error_file_id) if file_id]
        seen: set[str] = set()
        for text in texts:
            for line in text.splitlines():
                if line.strip():
                    self._take(record, json.loads(line), payloads, seen)
        if batch.status == "failed":  # the file itself was refused: every line failed with the batch's errors
            for key in payloads.keys() - seen:
                self._failed(record, key, f"the batch failed validation ({batch.errors or 'no reason given'})")
                seen.add(key)
        record.unanswered += len(payloads.keys() - seen)  # an expired or cancelled batch: asked again next round
        self.state.structured_output, self.state.format_settled = self._formats.form, self._formats.settled
        part.ingested = True
        self.state.save()

    def _take(self, record: RoundRecord, line: dict[str, Any], payloads: dict[str, Any], seen: set[str]) -> None:
        key = line.get("custom_id")
        if key not in payloads or key in seen:
            return  # not a line of ours (or a repeat): nothing to store it under
        if not line.get("response") and _code(line.get("error")) in NOT_RUN:
            return  # never run (the window ended first): unanswered, asked again next round, not an attempt
        seen.add(key)
        response = line.get("response") or {}
        status, body = response.get("status_code"), response.get("body")
        if status != 200 or not isinstance(body, dict):
            said = _message(line.get("error")) or body_message(body)
            if self._refused_form(record, payloads[key], status, said):
                record.format_refused += 1
                return
            self._failed(record, key, f"HTTP {status}: {said or 'no message'}")
            return
        try:
            reply = reply_from_chat_completion(body)
        except Exception as exc:  # a malformed answer fails this line, never the round
            self._failed(record, key, f"malformed answer: {type(exc).__name__}: {exc}")
            return
        if _formatted(payloads[key]):
            self._formats.succeeded(record.structured_output)
        completed_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.cache.put(key, payloads[key], {**reply.to_dict(), "completed_at": completed_at})
        record.answered += 1
        if reply.usage:
            record.prompt_tokens += reply.usage[0]
            record.completion_tokens += reply.usage[1]

    def _refused_form(self, record: RoundRecord, payload: Any, status: Any, said: str) -> bool:
        """A line refused for its form while the form is unsettled: the form steps down (once for the round)."""
        if not _formatted(payload) or self._formats.settled or not refuses_format(status, said):
            return False
        return self._formats.refused(record.structured_output)  # False at the last form: the line failed

    def _failed(self, record: RoundRecord, key: str, reason: str) -> None:
        record.failed_lines += 1
        self.state.attempts[key] = self.state.attempts.get(key, 0) + 1
        if self.state.attempts[key] >= self.retries:
            self.state.given_up[key] = f"{reason} ({self.state.attempts[key]} batch attempts)"


def _formatted(payload: Any) -> bool:
    params = payload.get("params") if isinstance(payload, dict) else None
    return isinstance(params, dict) and "response_format" in params


def _code(error: Any) -> str:
    return str(error.get("code") or "") if isinstance(error, dict) else ""


def _message(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error.get("code") or "")
    return str(error or "")


def _part_number(name: str) -> int:
    return int(name.removesuffix(".jsonl").rsplit("-", 1)[1])


def _payloads_name(name: str) -> str:
    return name.removesuffix(".jsonl") + ".payloads.jsonl"


def _read_payloads(path: Path) -> dict[str, Any]:
    return {entry["key"]: entry["payload"] for entry in map(json.loads, path.read_text().splitlines())}
