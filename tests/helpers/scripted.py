"""A scripted OpenAI-compatible chat server: chosen merges and chosen score distributions, counted.

It speaks the same ``/v1/chat/completions`` and ``/info`` as TGI, so the real client, scheduler, cache,
gate and retention code run unchanged; only the model's answers are scripted. Merge requests (they carry
``response_format``) are answered by ``merge(prompt, body) -> dict``; score requests (``logprobs``) by
``score(instruction, output) -> {digit: probability}``, parsed back out of Deita's prompt.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from tests.helpers.servers import LoopbackServer

_DEITA = re.compile(r"#Question#:\n(.*)\n#Response#:\n(.*) \n##Quality: $", re.DOTALL)
_DEITA_COMPLEXITY = re.compile(r"\n##Query: (.*)  \n##Complexity: $", re.DOTALL)
#: TGI's validation error for a top_n_tokens above its --max-top-n-tokens (router/src/validation.rs).
TGI_TOP_N_ERROR = "Input validation error: `top_n_tokens` must be >= 0 and <= {cap}. Given: {given}"
MergeScript = Callable[[str, dict], dict[str, str]]  # (prompt, request body) → merged fields
ScoreScript = Callable[[str, str], dict[str, float]]
ComplexityScript = Callable[[str], dict[str, float]]  # query → {digit: probability}


def peaked(digit: int, mass: float = 0.9) -> dict[str, float]:
    """A distribution over "1".."6" with ``mass`` on ``digit`` and the rest spread evenly."""
    rest = (1 - mass) / 5
    return {str(d): mass if d == digit else rest for d in range(1, 7)}


def parse_deita(prompt: str) -> tuple[str, str]:
    match = _DEITA.search(prompt)
    if match is None:
        raise ValueError(f"not Deita's quality prompt: {prompt[:200]!r}")
    return match.group(1), match.group(2)


@dataclass
class ScriptedServer(LoopbackServer):
    merge: MergeScript
    score: ScoreScript
    model_id: str = "scripted/merge-model"
    slots: int = 4
    complexity: ComplexityScript | None = None
    latency_s: float = 0.0  # each answer takes this long, one slot held, as a busy server's would
    requests: Counter = field(default_factory=Counter)  # "merge" / "score" / "complexity" → requests answered
    prompts: list[str] = field(default_factory=list)  # every prompt received, in arrival order
    held: list[int] = field(default_factory=list)  # requests held (this one included) as each arrived
    slot_seconds: float = 0.0  # time slots spent answering
    serves_info: bool = True  # TGI's /info; servers of other kinds have none
    serves_queue_metrics: bool = False  # vLLM's /metrics: requests running and waiting for a slot
    # ... and its count of tokens generated: it rises by the requests running at each reading, or (a stuck
    # server) not at all; None: /metrics has no such counter
    generation: str | None = None  # "moving" / "stuck" / None
    _generated: float = 0.0
    # judge prompt → P(yes), or a first-token distribution of its own; None: judge prompts are refused
    judge: Callable[[str], float | dict[str, float]] | None = None
    # Every Nth chat request is answered HTTP 200 with something that is not a chat completion, the kinds
    # of MALFORMED in turn (0: never); ``malformed_sent`` counts them by kind.
    info_requests: int = 0  # probes: GET /info
    malformed_every: int = 0
    malformed_kinds: tuple[str, ...] = ()  # () : every kind of MALFORMED
    malformed_sent: Counter = field(default_factory=Counter)
    # An OpenAI-shaped rate limit: at most this many requests admitted per second (a window that slides),
    # 429 with x-ratelimit-* headers beyond it (0: none); ``refused`` counts them.
    rate_per_s: int = 0
    refused: int = 0
    # vLLM's --max-logprobs: a request asking for more top logprobs answers 400 (0: no cap)
    max_logprobs: int = 0
    # A chat request without ``Authorization: Bearer <required_key>`` answers 401 (None: no key asked)
    required_key: str | None = None
    first_arrival: float | None = None  # perf_counter of the first request since the last reset
    last_answer: float | None = None  # perf_counter of the last answer sent
    _holding: int = 0
    _arrivals: int = 0
    _first_merge_at: float | None = None  # arrival of the first merge request: where stage 2 starts
    _stage2_slot_seconds: float = 0.0
    _admitted: list[float] = field(default_factory=list)  # when each request of the last second was admitted
    # (arrival, slot taken, answered, kind) of every answered request, for /stats?timeline=1
    timeline: list[tuple[float, float, float, str]] = field(default_factory=list)

    def routes(self, app: web.Application) -> None:
        # Requests beyond the slots wait for one, as TGI queues what exceeds max_concurrent_requests.
        self._slots = asyncio.Semaphore(self.slots)
        if self.serves_info:
            app.router.add_get("/info", self._info)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/stats", self._stats)
        if self.serves_queue_metrics:
            app.router.add_get("/metrics", self._metrics)

    async def _stats(self, request: web.Request) -> web.Response:
        """What the server saw, for a client in another process (bench/merge.py); ?reset=1 starts over."""
        stats = {"requests": sum(self.requests.values()), "max_held": max(self.held, default=0)}
        stats["slot_seconds"] = self.slot_seconds
        stats["refused"] = self.refused  # 429s of the rate limit
        stats["probes"] = self.info_requests
        # Stage 2 alone (from the first merge request; the scorer check and the probe come before it)
        stats["stage2_slot_seconds"] = self._stage2_slot_seconds
        stats["stage2_span_s"] = (self.last_answer or 0.0) - (self._first_merge_at or 0.0)
        # From the first request to the last answer: the time the client kept the server working for.
        stats["busy_span_s"] = (self.last_answer or 0.0) - (self.first_arrival or 0.0)
        if request.query.get("timeline"):
            stats["timeline"] = self.timeline
        if request.query.get("reset"):
            self.requests.clear()
            self.held.clear()
            self.slot_seconds = 0.0
            self.refused = 0
            self.info_requests = 0
            self._first_merge_at, self._stage2_slot_seconds = None, 0.0
            self.first_arrival = self.last_answer = None
            self.timeline.clear()
        return web.json_response(stats)

    async def _metrics(self, request: web.Request) -> web.Response:
        """vLLM's two scheduler gauges, as its Prometheus text writes them."""
        labels = f'{{engine="0",model_name="{self.model_id}"}}'
        running, waiting = min(self._holding, self.slots), max(0, self._holding - self.slots)
        text = (
            "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
            "# TYPE vllm:num_requests_running gauge\n"
            f"vllm:num_requests_running{labels} {float(running)}\n"
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
            "# TYPE vllm:num_requests_waiting gauge\n"
            f"vllm:num_requests_waiting{labels} {float(waiting)}\n"
        )
        if self.generation is not None:
            self._generated += running if self.generation == "moving" else 0
            text += f"vllm:generation_tokens_total{labels} {self._generated}\n"
        return web.Response(text=text, content_type="text/plain")

    async def _info(self, request: web.Request) -> web.Response:
        self.info_requests += 1  # a client's probe
        return web.json_response({"model_id": self.model_id, "max_concurrent_requests": self.slots})

    async def _chat(self, request: web.Request) -> web.Response:
        if self.first_arrival is None:
            self.first_arrival = time.perf_counter()
        if self.required_key is not None and request.headers.get("Authorization") != f"Bearer {self.required_key}":
            self.requests["refused key"] += 1
            return web.json_response(
                {"error": {"message": "Invalid API key", "type": "invalid_request_error"}}, status=401
            )
        if self.rate_per_s:
            refusal = self._rate_limited()
            if refusal is not None:
                return refusal
        self._holding += 1
        self.held.append(self._holding)
        arrived = time.perf_counter()
        try:
            async with self._slots:
                started = time.perf_counter()
                await asyncio.sleep(self.latency_s)
                self._arrivals += 1
                if self.malformed_every and self._arrivals % self.malformed_every == 0:
                    kinds = self.malformed_kinds or MALFORMED
                    kind = kinds[(self._arrivals // self.malformed_every) % len(kinds)]
                    self.malformed_sent[kind] += 1
                    return malformed_answer(kind)
                kinds_before = self.requests.copy()
                response = await self._answer(request)
                kind = next(iter((self.requests - kinds_before).keys()), "?")
                if self._first_merge_at is None and kind == "merge":
                    self._first_merge_at = started
                if self.rate_per_s:  # as OpenAI's: every answer says what is left of the window
                    left = max(0, self.rate_per_s - len(self._admitted))
                    response.headers["x-ratelimit-remaining-requests"] = str(left)
                self.last_answer = time.perf_counter()
                self.slot_seconds += self.last_answer - started
                self.timeline.append((arrived, started, self.last_answer, kind))
                if self._first_merge_at is not None and started >= self._first_merge_at:
                    self._stage2_slot_seconds += self.last_answer - started
                return response
        finally:
            self._holding -= 1

    def _rate_limited(self) -> web.Response | None:
        now = time.perf_counter()
        self._admitted = [at for at in self._admitted if now - at < 1.0]
        headers = {"x-ratelimit-limit-requests": str(self.rate_per_s)}
        if len(self._admitted) >= self.rate_per_s:
            self.refused += 1
            reset_ms = max(1, int((1.0 - (now - self._admitted[0])) * 1000))
            headers |= {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": f"{reset_ms}ms"}
            error = {"error": {"message": "Rate limit reached for requests", "type": "requests"}}
            return web.json_response(error, status=429, headers=headers)
        self._admitted.append(now)
        return None

    async def _answer(self, request: web.Request) -> web.Response:
        return self.answer_body(await request.json())

    def answer_body(self, body: dict) -> web.Response:
        """The answer to one chat completion body (also a batch file's line: ``batch_server``)."""
        if self.max_logprobs and (body.get("top_logprobs") or 0) > self.max_logprobs:
            self.requests["refused logprobs"] += 1
            message = f"Requested sample logprobs of {body['top_logprobs']}, which is greater than max allowed: "
            return web.json_response({"object": "error", "message": message + str(self.max_logprobs)}, status=400)
        prompt = body["messages"][-1]["content"]
        self.prompts.append(prompt)
        query = _DEITA_COMPLEXITY.search(prompt)
        if body.get("logprobs") and query:
            if self.complexity is None:
                raise web.HTTPBadRequest(text="no complexity script")
            self.requests["complexity"] += 1
            return web.json_response(_score_reply(self.complexity(query.group(1)), body.get("top_logprobs") or 1))
        if body.get("logprobs") and "## Merged example" in prompt:
            if self.judge is None:
                raise web.HTTPBadRequest(text="no judge script")
            self.requests["judge"] += 1
            answer = self.judge(prompt)
            if isinstance(answer, dict):  # a distribution of its own (e.g. neither word)
                verdict = answer
            else:
                p_yes = min(max(answer, 1e-6), 1 - 1e-6)
                verdict = {"Yes": p_yes, "No": 1 - p_yes}
            return web.json_response(_score_reply(verdict, body.get("top_logprobs") or 1))
        if body.get("logprobs"):
            self.requests["score"] += 1
            distribution = self.score(*parse_deita(prompt))
            return web.json_response(_score_reply(distribution, body.get("top_logprobs") or 1))
        self.requests["merge"] += 1
        return web.json_response(_reply(json.dumps(self.merge(prompt, body)), None))


#: What gateways and proxies answer under load with status 200 instead of a chat completion.
MALFORMED = ("html page", "empty choices", "error object", "json cut in half")


def malformed_answer(kind: str) -> web.Response:
    if kind == "html page":
        return web.Response(text="<html><body><h1>502 Bad Gateway</h1></body></html>", content_type="text/html")
    if kind == "empty choices":
        return web.json_response({"id": "x", "object": "chat.completion", "choices": []})
    if kind == "error object":
        return web.json_response({"error": {"message": "upstream overloaded", "type": "server_error"}})
    whole = json.dumps(_reply('{"instruction": "a", "input": "", "output": "b"}', None))
    return web.Response(text=whole[: len(whole) // 2], content_type="application/json")


def _score_reply(distribution: dict[str, float], top_n: int) -> dict:
    ranked = sorted(distribution.items(), key=lambda kv: -kv[1])[:top_n]
    tops = [{"token": token, "logprob": math.log(p), "bytes": None} for token, p in ranked]
    logprobs = {"content": [{"token": ranked[0][0], "logprob": math.log(ranked[0][1]), "top_logprobs": tops}]}
    return _reply(ranked[0][0], logprobs)


def _reply(content: str, logprobs: dict | None) -> dict:
    return {
        "id": "scripted",
        "object": "chat.completion",
        "created": 0,
        "model": "scripted",
        "system_fingerprint": "scripted",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "logprobs": logprobs,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


@dataclass
class TgiScorer(LoopbackServer):
    """A TGI-shaped scorer: ``/info``, a ``/v1/completions`` without logprobs (as TGI's), and ``/generate``
    with ``details`` and ``top_n_tokens`` capped at ``cap`` (422 above it, as TGI's default of 5)."""

    score: ScoreScript
    model_id: str = "scripted/deita-quality-scorer"
    cap: int = 5
    slots: int = 4
    posted: list[tuple[str, dict]] = field(default_factory=list)  # (path, JSON body) of every request

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/info", self._info)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/generate", self._generate)

    async def _info(self, request: web.Request) -> web.Response:
        return web.json_response({"model_id": self.model_id, "max_concurrent_requests": self.slots})

    async def _completions(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.posted.append((request.path, body))
        choice = {"index": 0, "text": "4", "logprobs": None, "finish_reason": "length"}
        return web.json_response({"id": "", "object": "text_completion", "model": self.model_id, "choices": [choice]})

    async def _generate(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.posted.append((request.path, body))
        top_n = body["parameters"].get("top_n_tokens") or 0
        if top_n > self.cap:
            error = TGI_TOP_N_ERROR.format(cap=self.cap, given=top_n)
            return web.json_response({"error": error, "error_type": "validation"}, status=422)
        ranked = sorted(self.score(*parse_deita(body["inputs"])).items(), key=lambda kv: -kv[1])
        tokens = [{"id": int(t), "text": t, "logprob": math.log(p), "special": False} for t, p in ranked]
        details = {
            "finish_reason": "length",
            "generated_tokens": 1,
            "tokens": tokens[:1],
            "top_tokens": [tokens[:top_n]],
        }
        return web.json_response({"generated_text": ranked[0][0], "details": details})
