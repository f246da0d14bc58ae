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
from collections.abc import Callable
from typing import Any, Literal

from mergeit_hf.endpoints.base import ChatReply, usage_of
from mergeit_hf.endpoints.http.client import JsonHttpClient
from mergeit_hf.endpoints.probe import ServerInfo, model_label
from mergeit_hf.endpoints.servers.served import ServedBackend
from mergeit_hf.errors import EndpointError

Route = Literal["/v1/completions", "/generate"]
_ABSENT = frozenset({404, 405})
_TOP_N_CAP = re.compile(r"top_n_tokens.*?<=\s*(\d+)", re.IGNORECASE | re.DOTALL)
logger = logging.getLogger(__name__)


class CompletionEndpointBackend(ServedBackend):
    """A scorer server at ``url``, probed (``server``) before the first request."""

    kind = "raw-completions"

    def __init__(self, url: str, server: ServerInfo, http: JsonHttpClient) -> None:
        super().__init__(url, server, http)
        self.route: Route | None = None  # decided by the first answer
        self._top_n_cap: int | None = None

    def __repr__(self) -> str:  # never show the key
        return f"CompletionEndpointBackend(url={self.url!r}, route={self.route!r})"

    def describe(self) -> dict[str, str]:
        return {"kind": self.kind, "model": model_label(self.model_id), "route": self.route or "not decided"}

    async def complete(self, prompt: str, params: dict[str, Any]) -> ChatReply:
        """The first generated token's top alternatives after ``prompt``, sent byte for byte."""
        if self.route != "/generate":
            reply = await self._openai_completion(prompt, params)
            if reply is not None and (reply.first_top_logprobs or not params.get("logprobs")):
                self.route = "/v1/completions"
                return reply
            if self.route == "/v1/completions":
                # Settled by earlier answers: one 404 or one answer without logprobs is this request's problem
                # (an unavailable score, counted as such), not a reason to send every later score elsewhere.
                if reply is None:
                    raise EndpointError(f"{self.url}/v1/completions answered 404 after serving earlier scores")
                return reply
            if self.route is None:
                logger.info("%s: /v1/completions gives no logprobs here; scoring through TGI's /generate", self.url)
            self.route = "/generate"
        return await self._tgi_generate(prompt, params)

    async def _openai_completion(self, prompt: str, params: dict[str, Any]) -> ChatReply | None:
        body: dict[str, Any] = {
            "model": self.model_id,
            "prompt": prompt,
            "max_tokens": params.get("max_tokens", 1),
            "temperature": params.get("temperature", 1.0),
            "seed": params.get("seed"),
        }
        if params.get("logprobs"):
            body["logprobs"] = params.get("top_logprobs", 1)
        return await self._post("/v1/completions", body, _reply_from_completion)

    async def _tgi_generate(self, prompt: str, params: dict[str, Any]) -> ChatReply:
        wanted = params.get("top_logprobs", 1) if params.get("logprobs") else 0
        top_n = min(wanted, self._top_n_cap) if self._top_n_cap else wanted
        # Greedy (no sampling): TGI then reports the model's own log-softmax, unwarped.
        parameters = {"max_new_tokens": params.get("max_tokens", 1), "details": True, "seed": params.get("seed")}
        if top_n:
            parameters["top_n_tokens"] = top_n
        try:
            reply = await self._post("/generate", {"inputs": prompt, "parameters": parameters}, _reply_from_generate)
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
        if reply is None:
            raise EndpointError(
                f"the scorer endpoint {self.url} serves neither /v1/completions with logprobs nor TGI's /generate"
            )
        return reply

    async def _post(self, path: str, body: dict[str, Any], read: Callable[[Any], ChatReply]) -> ChatReply | None:
        """The answer read, or None where the server has no such route; transient failures (malformed answers
        too) retried as for chat."""
        posted = await self._http.post(path, body, read=read)
        response = posted.response
        if response.status_code in _ABSENT:
            return None
        if response.status_code == 422 and path == "/generate":
            cap = _TOP_N_CAP.search(response.text)
            if cap:
                raise _CappedTopN(int(cap.group(1)))
        self._http.check(path, response)
        return posted.value


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
    return ChatReply(choice.get("text") or "", tops, choice.get("finish_reason"), usage_of(answer))


def _reply_from_generate(answer: dict[str, Any] | list[dict[str, Any]]) -> ChatReply:
    answer = answer[0] if isinstance(answer, list) else answer
    details = answer.get("details") or {}
    top_tokens = details.get("top_tokens") or []
    chosen = details.get("tokens") or []
    if top_tokens and top_tokens[0]:
        tops = tuple((t["text"], float(t["logprob"])) for t in top_tokens[0])
    else:
        tops = tuple((t["text"], float(t["logprob"])) for t in chosen[:1])
    generated = details.get("generated_tokens")
    prefill = details.get("prefill") or []
    usage = (len(prefill), int(generated)) if generated is not None and prefill else None
    return ChatReply(answer.get("generated_text") or "", tops, details.get("finish_reason"), usage)
