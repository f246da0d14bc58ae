"""OpenAI's Files and Batches API, as OpenAI documents it (and vLLM, LiteLLM and other gateways copy it):
upload a JSON lines file (``purpose=batch``), create a batch over it, poll it, download its output and error
files. Transient failures are retried as every other request is (``http.transport.retrying``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import httpx

from mergeit_hf.endpoints.http.transport import failure, is_retryable_status, retrying

T = TypeVar("T")

#: The statuses after which a batch changes no more; its output and error files are then final.
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
#: The error code of a batch refused because the provider's queue for the model holds too many tokens
#: ("Enqueued token limit reached ... try again once some in_progress batches have been completed").
QUEUE_FULL = "token_limit_exceeded"


@dataclass(frozen=True)
class BatchInfo:
    """What the provider says of one batch."""

    id: str
    status: str
    input_file_id: str
    output_file_id: str | None
    error_file_id: str | None
    counts: dict[str, int]
    errors: str  # why the batch failed validation, where it did
    error_codes: tuple[str, ...] = ()

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    @property
    def queue_full(self) -> bool:
        """Failed for the enqueued-token limit: nothing in it ran, the same file may be created again later."""
        return self.status == "failed" and QUEUE_FULL in self.error_codes

    @classmethod
    def of(cls, answer: dict[str, Any]) -> BatchInfo:
        errors = (answer.get("errors") or {}).get("data") or []
        said = "; ".join(
            f"line {e.get('line')}: {e.get('message')}" if e.get("line") else str(e.get("message")) for e in errors
        )
        return cls(
            answer["id"],
            answer["status"],
            answer["input_file_id"],
            answer.get("output_file_id"),
            answer.get("error_file_id"),
            dict(answer.get("request_counts") or {}),
            said,
            tuple(str(e.get("code")) for e in errors if e.get("code")),
        )


class BatchApi:
    """One provider's ``/v1/files`` and ``/v1/batches``; the key is held here only and never shown."""

    def __init__(self, url: str, key: str | None, *, key_variable: str, timeout_s: float, attempts: int) -> None:
        self.url = url
        self._key, self._key_variable = key, key_variable
        self._attempts = attempts
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._timeout_s = timeout_s
        self._opened: httpx.AsyncClient | None = None  # opened in the running loop; each round runs its own

    @property
    def _client(self) -> httpx.AsyncClient:
        if self._opened is None:
            self._opened = httpx.AsyncClient(base_url=self.url, headers=self._headers, timeout=self._timeout_s)
        return self._opened

    def __repr__(self) -> str:
        return f"BatchApi(url={self.url!r})"

    async def upload(self, name: str, content: bytes) -> str:
        """The file id of ``content`` uploaded for a batch."""
        files = {"file": (name, content, "application/jsonl")}
        answer = await self._call(
            "/v1/files", lambda: self._client.post("/v1/files", data={"purpose": "batch"}, files=files)
        )
        return str(answer.json()["id"])

    async def create(self, input_file_id: str, route: str, window: str, metadata: dict[str, str]) -> BatchInfo:
        body = {"input_file_id": input_file_id, "endpoint": route, "completion_window": window, "metadata": metadata}
        answer = await self._call("/v1/batches", lambda: self._client.post("/v1/batches", json=body))
        return BatchInfo.of(answer.json())

    async def get(self, batch_id: str) -> BatchInfo:
        path = f"/v1/batches/{batch_id}"
        return BatchInfo.of((await self._call(path, lambda: self._client.get(path))).json())

    async def find(self, input_file_id: str) -> BatchInfo | None:
        """The batch created over ``input_file_id``, if one was (a client killed right after creating it)."""
        params: dict[str, Any] = {"limit": 100}
        while True:  # newest first, a page at a time: an account with many batches lists more than one page
            page = (await self._call("/v1/batches", partial(self._client.get, "/v1/batches", params=params))).json()
            batches = page.get("data") or []
            for batch in batches:
                if batch.get("input_file_id") == input_file_id:
                    return BatchInfo.of(batch)
            if not page.get("has_more") or not batches:
                return None
            params = {"limit": 100, "after": batches[-1]["id"]}

    async def content(self, file_id: str) -> bytes:
        path = f"/v1/files/{file_id}/content"
        return (await self._call(path, lambda: self._client.get(path))).content

    async def check(self) -> None:
        """The batch API answers here (a listing): a server without one stops the run before stage 1."""
        await self._call("/v1/batches", lambda: self._client.get("/v1/batches", params={"limit": 1}))

    async def _call(self, path: str, send: Callable[[], Awaitable[httpx.Response]]) -> httpx.Response:
        try:
            async for attempt in retrying(self._attempts):
                with attempt:
                    response = await send()
                    if is_retryable_status(response.status_code) or not response.is_success:
                        response.raise_for_status()
                    return response
        except Exception as exc:
            raise failure(self.url + path, exc, self._key, self._key_variable) from None
        raise AssertionError("unreachable: the retry loop returns or raises")

    async def aclose(self) -> None:
        opened, self._opened = self._opened, None
        if opened is not None:
            await opened.aclose()
