"""Scripted servers that enforce each server's own rules, and faults injected as real servers send them.

- ``tgi``: answers ``/info``; structured output only as TGI's grammar (``{"type": "json" | "json_object",
  "value": schema}``), anything else 422.
- ``vllm`` / ``sglang``: no ``/info``; ``/v1/models`` lists one served name; a request naming any other
  model gets vLLM's ``404 The model `X` does not exist.``
- ``openai``: no ``/info``; several models listed; a Bearer key required (401 otherwise); an unlisted model
  404; ``response_format`` exactly as OpenAI's schema (``json_schema`` with name and schema, ``json_object``,
  ``text``; any other key or type 400), or, with ``json_schema_supported=False``, ``json_schema`` refused
  with 400 as for models without structured outputs.
- ``llamacpp``: llama-cpp-python's server: no ``/info``, one model listed, ``response_format`` type
  ``text`` or ``json_object`` (with an optional ``schema``); ``json_schema`` refused with the 500 its error
  handler wraps a validation error in (measured on llama-cpp-python 0.3.36).

``fault_rate`` answers that share of chat requests with a fault, drawn from a seeded generator, spread
evenly over 503 + Retry-After, 429 with OpenAI's rate-limit headers, 500, and a dropped connection.
Every chat request is logged with what it got (``log``).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from aiohttp import web

from tests.helpers.scripted import ScriptedServer

FAULTS = ("503", "429", "500", "drop")


def _openai_error(status: int, message: str, param: str | None = None) -> web.Response:
    error = {"message": message, "type": "invalid_request_error", "param": param, "code": None}
    return web.json_response({"error": error}, status=status)


def _vllm_error(status: int, message: str) -> web.Response:
    body = {"object": "error", "message": message, "type": "NotFoundError", "param": None, "code": status}
    return web.json_response(body, status=status)


@dataclass
class DialectServer(ScriptedServer):
    dialect: str = "tgi"
    served: tuple[str, ...] = ("scripted/merge-model",)
    lists_models: bool = True  # False: /v1/models answers 404, as some gateways do
    api_key: str | None = None
    json_schema_supported: bool = True
    fault_rate: float = 0.0
    fault_seed: int = 0
    retry_after: str = "1"
    log: list[tuple[str, str]] = field(default_factory=list)  # (what was asked, what it got) per chat request
    formats: Counter = field(default_factory=Counter)  # response_format forms received, by a short name
    models: Counter = field(default_factory=Counter)  # the model each chat request named
    _faults: random.Random = field(init=False)

    def routes(self, app: web.Application) -> None:
        self.serves_info = self.dialect == "tgi"
        super().routes(app)
        self._faults = random.Random(self.fault_seed)
        if self.lists_models:
            app.router.add_get("/v1/models", self._models)

    async def _models(self, request: web.Request) -> web.Response:
        refused = self._refuse_key(request)
        if refused is not None:
            return refused
        return web.json_response({"object": "list", "data": [{"id": m, "object": "model"} for m in self.served]})

    def _refuse_key(self, request: web.Request) -> web.Response | None:
        if self.api_key is None or request.headers.get("Authorization") == f"Bearer {self.api_key}":
            return None
        return _openai_error(401, "Incorrect API key provided. You can find your API key in your account settings.")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        if self.fault_rate and self._faults.random() < self.fault_rate:
            fault = self._faults.choice(FAULTS)
            self.log.append(("chat", fault))
            if fault == "drop":
                request.transport.close()
                raise ConnectionResetError("dropped on purpose")
            if fault == "503":
                headers = {"Retry-After": self.retry_after}
                return web.json_response({"error": "Model is overloaded"}, status=503, headers=headers)
            if fault == "429":
                headers = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "250ms"}
                error = {"message": "Rate limit reached for requests", "type": "requests"}
                return web.json_response({"error": error}, status=429, headers=headers)
            return web.json_response({"error": "Internal server error"}, status=500)
        body = await request.json()
        refused = self._refuse_key(request) or self._refuse(body)
        if refused is not None:
            self.log.append(("chat", str(refused.status)))
            return refused
        response = await super()._chat(request)
        self.log.append(("chat", str(response.status)))
        return response

    def _refuse(self, body: dict) -> web.Response | None:
        model = body.get("model")
        self.models[model] += 1
        if self.dialect in ("vllm", "sglang", "openai") and model not in self.served:
            if self.dialect == "openai":
                return _openai_error(404, f"The model `{model}` does not exist or you do not have access to it.")
            return _vllm_error(404, f"The model `{model}` does not exist.")
        response_format = body.get("response_format")
        if response_format is None:
            return None
        kind = response_format.get("type")
        self.formats[kind + ("+schema" if "schema" in response_format else "")] += 1
        return getattr(self, f"_format_{self.dialect}", lambda rf: None)(response_format)

    def _format_openai(self, response_format: dict) -> web.Response | None:
        kind = response_format.get("type")
        allowed = {"json_schema": {"type", "json_schema"}, "json_object": {"type"}, "text": {"type"}}
        if kind not in allowed:
            said = f"Invalid value: '{kind}'. Supported values are: 'json_object', 'json_schema', and 'text'."
            return _openai_error(400, said, "response_format.type")
        extra = sorted(set(response_format) - allowed[kind])
        if extra:
            said = f"Unrecognized request argument supplied: response_format.{extra[0]}"
            return _openai_error(400, said, "response_format")
        if kind == "json_schema":
            if not self.json_schema_supported:
                said = "Invalid parameter: 'response_format' of type 'json_schema' is not supported with this model."
                return _openai_error(400, said, "response_format")
            spec = response_format["json_schema"]
            if not {"name", "schema"} <= set(spec):
                return _openai_error(
                    400, "Missing required parameter: 'response_format.json_schema.name'.", "response_format"
                )
        return None

    def _format_llamacpp(self, response_format: dict) -> web.Response | None:
        if response_format.get("type") not in ("text", "json_object"):
            message = (
                "1 validation error: {'type': 'literal_error', 'loc': ('body', 'response_format', 'type'), "
                "'msg': \"Input should be 'text' or 'json_object'\"}"
            )
            error = {"message": message, "type": "internal_server_error", "param": None, "code": None}
            return web.json_response({"error": error}, status=500)
        return None

    def _format_tgi(self, response_format: dict) -> web.Response | None:
        if response_format.get("type") not in ("json", "json_object", "regex") or "value" not in response_format:
            said = "Failed to deserialize the JSON body into the target type: response_format"
            return web.json_response({"error": said, "error_type": "validation"}, status=422)
        return None
