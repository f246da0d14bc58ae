"""Raw completions for a scorer model of its own: the prompt as is (no chat template), first-token logprobs.

The paper's quality score comes from the Deita scorer (``hkust-nlp/deita-quality-scorer``), a fine-tuned
LLaMA with no chat template: the score is its next-token distribution over "1".."6" right after Deita's
raw prompt. Two HTTP routes give that distribution:

``/v1/completions`` with ``logprobs``
    OpenAI's completions API, served by vLLM and by both llama.cpp servers;
``/generate`` with ``details`` and ``top_n_tokens``
    TGI's own API. TGI also serves ``/v1/completions``, but without logprobs.

The first request tries ``/v1/completions``; where it is absent (404/405) or answers without logprobs,
``/generate`` is used from then on. TGI refuses ``top_n_tokens`` above its ``--max-top-n-tokens`` (5 by
default) with a 422 that names the cap: the request is sent again at the cap, and the missing-digit
accounting of ``scoring`` then counts what the cap hides. httpx rather than huggingface_hub's
InferenceClient, which has no call for OpenAI-style raw completions with logprobs.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Literal

import httpx

from mergeit_hf.endpoints.base import DEFAULT_CONCURRENCY, ChatReply
from mergeit_hf.endpoints.transport import failure, probe_server, retrying, token_from_environment
from mergeit_hf.errors import EndpointError

Route = Literal["/v1/completions", "/generate"]
_ABSENT = frozenset({404, 405})
_TOP_N_CAP = re.compile(r"top_n_tokens.*?<=\s*(\d+)", re.IGNORECASE | re.DOTALL)
logger = logging.getLogger(__name__)


class CompletionEndpointBackend:
    """A scorer server at ``url`` answering raw completions; the token as for the merge endpoint."""

    def __init__(self, url: str, *, token: str | None = None, timeout_s: float = 120.0, attempts: int = 6):
        self.url = url.rstrip("/")
        self._token = token if token is not None else token_from_environment()
        self._headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        self._timeout_s = timeout_s
        self._limits: httpx.Limits | None = None  # None: httpx's default pool, until ``size_pool`` sizes it
        self._http: httpx.AsyncClient | None = None  # opened by the first request, inside the running loop
        self._attempts = attempts
        self.model_id = self.url
        self.default_concurrency = DEFAULT_CONCURRENCY
        self.route: Route | None = None  # decided by the first answer
        self._served_name: str | None = None
        self._top_n_cap: int | None = None

    def __repr__(self) -> str:  # never show the token
        return f"CompletionEndpointBackend(url={self.url!r}, route={self.route!r})"

    async def probe(self) -> None:
        server = await probe_server(self.url, self._token, "scorer endpoint", self._timeout_s)
        self.model_id, self.default_concurrency, self._served_name = (
            server.model_id,
            server.concurrency,
            server.served_name,
        )

    async def size_pool(self, connections: int) -> None:
        """A connection pool as large as the concurrency (httpx's default of 100 would cap it)."""
        await self.aclose()
        self._limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            pool = {"limits": self._limits} if self._limits else {}
            self._http = httpx.AsyncClient(timeout=self._timeout_s, headers=self._headers, **pool)
        return self._http

    async def complete(self, prompt: str, params: dict[str, Any]) -> ChatReply:
        """The first generated token's top alternatives after ``prompt``, sent byte for byte."""
        if self.route != "/generate":
            reply = await self._openai_completion(prompt, params)
            if reply is not None and (reply.first_top_logprobs or not params.get("logprobs")):
                self.route = "/v1/completions"
                return reply
            if self.route is None:
                logger.info("%s: /v1/completions gives no logprobs here; scoring through TGI's /generate", self.url)
            self.route = "/generate"
        return await self._tgi_generate(prompt, params)

    async def _openai_completion(self, prompt: str, params: dict[str, Any]) -> ChatReply | None:
        body: dict[str, Any] = {
            "prompt": prompt,
            "max_tokens": params.get("max_tokens", 1),
            "temperature": params.get("temperature", 1.0),
            "seed": params.get("seed"),
        }
        if params.get("logprobs"):
            body["logprobs"] = params.get("top_logprobs", 1)
        if self._served_name:
            body["model"] = self._served_name
        answer = await self._post("/v1/completions", body)
        return _reply_from_completion(answer) if answer is not None else None

    async def _tgi_generate(self, prompt: str, params: dict[str, Any]) -> ChatReply:
        wanted = params.get("top_logprobs", 1) if params.get("logprobs") else 0
        top_n = min(wanted, self._top_n_cap) if self._top_n_cap else wanted
        # Greedy (no sampling): TGI then reports the model's own log-softmax, unwarped.
        parameters = {"max_new_tokens": params.get("max_tokens", 1), "details": True, "seed": params.get("seed")}
        if top_n:
            parameters["top_n_tokens"] = top_n
        try:
            answer = await self._post("/generate", {"inputs": prompt, "parameters": parameters})
        except _CappedTopN as capped:
            if top_n <= capped.cap:  # refused at or below the cap it names: retrying cannot help
                raise EndpointError(f"{self.url}/generate refused top_n_tokens={top_n} (cap {capped.cap})") from None
            if self._top_n_cap is None:
                logger.warning(
                    "%s caps top_n_tokens at %d: quality scores see only the top %d tokens "
                    "(launch TGI with --max-top-n-tokens 6 or more to see all six digits)",
                    self.url,
                    capped.cap,
                    capped.cap,
                )
            self._top_n_cap = min(capped.cap, self._top_n_cap or capped.cap)
            return await self._tgi_generate(prompt, params)
        if answer is None:
            raise EndpointError(
                f"the scorer endpoint {self.url} serves neither /v1/completions with logprobs nor TGI's /generate"
            )
        return _reply_from_generate(answer)

    async def _post(self, path: str, body: dict[str, Any]) -> Any:
        """The JSON answer, or None where the server has no such route; transient failures retried as for chat."""
        try:
            async for attempt in retrying(self._attempts):
                with attempt:
                    response = await self._client().post(self.url + path, json=body)
                    if response.status_code in _ABSENT:
                        return None
                    if response.status_code == 422 and path == "/generate":
                        cap = _TOP_N_CAP.search(response.text)
                        if cap:
                            raise _CappedTopN(int(cap.group(1)))
                    response.raise_for_status()
                    return response.json()
        except _CappedTopN:
            raise
        except Exception as exc:
            raise failure(self.url + path, exc, self._token) from None
        return None  # unreachable: the retry loop either returns or raises

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None


class _CappedTopN(Exception):
    def __init__(self, cap: int) -> None:
        super().__init__(f"top_n_tokens capped at {cap}")
        self.cap = cap


def _reply_from_completion(answer: dict[str, Any]) -> ChatReply:
    """OpenAI's legacy shape (``top_logprobs``: one {token: logprob} per position; vLLM, llama-cpp-python)
    or llama-server's newer one (``content``: [{token, logprob, top_logprobs: [...]}])."""
    choice = answer["choices"][0]
    logprobs = choice.get("logprobs") or {}
    tops: tuple[tuple[str, float], ...] = ()
    legacy = logprobs.get("top_logprobs") or []
    if legacy and legacy[0]:
        tops = tuple((str(token), float(value)) for token, value in legacy[0].items())
    elif logprobs.get("content"):
        first = logprobs["content"][0]
        tops = tuple((alt["token"], float(alt["logprob"])) for alt in first.get("top_logprobs") or [])
    return ChatReply(choice.get("text") or "", tops, choice.get("finish_reason"))


def _reply_from_generate(answer: dict[str, Any] | list[dict[str, Any]]) -> ChatReply:
    answer = answer[0] if isinstance(answer, list) else answer
    details = answer.get("details") or {}
    top_tokens = details.get("top_tokens") or []
    chosen = details.get("tokens") or []
    if top_tokens and top_tokens[0]:
        tops = tuple((t["text"], float(t["logprob"])) for t in top_tokens[0])
    else:
        tops = tuple((t["text"], float(t["logprob"])) for t in chosen[:1])
    return ChatReply(answer.get("generated_text") or "", tops, details.get("finish_reason"))
