"""Structured output in each server's dialect, decided once per run.

Requests carry OpenAI's form, ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``.
TGI reads its grammar (huggingface_hub's client rewrites the form into it), llama.cpp in process its
``json_object`` + ``schema``. An OpenAI-compatible server gets the strongest form it accepts: OpenAI's
``json_schema``; then ``json_object`` with ``schema`` (llama-cpp-python's server, which refuses the first
with a 500 naming response_format); then plain ``json_object``; then nothing (the prompt and the strict
parser alone). A refusal (400, 422 or 500 whose message is about the format) moves down one step for every
later request, until a request succeeds: from then on the format is settled and an error is the request's
own.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx

from mergeit_hf.endpoints.http.transport import server_message

logger = logging.getLogger(__name__)

JSON_SCHEMA = "json_schema"
JSON_OBJECT_WITH_SCHEMA = "json_object+schema"
JSON_OBJECT = "json_object"
PROMPT_ONLY = "none (prompt and strict parser)"
OPENAI_LADDER = (JSON_SCHEMA, JSON_OBJECT_WITH_SCHEMA, JSON_OBJECT, PROMPT_ONLY)
#: Words a server's refusal of a response_format contains (OpenAI, vLLM, SGLang, FastAPI validation).
_FORMAT_WORDS = ("response_format", "json_schema", "json_object", "schema", "grammar", "guided")


def json_schema_format(schema: dict[str, Any], name: str) -> dict[str, Any]:
    """OpenAI's structured-output form, the one requests carry and the request cache keys on."""
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def schema_of(response_format: dict[str, Any]) -> dict[str, Any]:
    return response_format["json_schema"]["schema"]


def in_form(params: dict[str, Any], form: str) -> dict[str, Any]:
    """``params`` with its response_format (if any) written in ``form``."""
    requested = params.get("response_format")
    if requested is None or form == JSON_SCHEMA:
        return params
    rest = {name: value for name, value in params.items() if name != "response_format"}
    if form == JSON_OBJECT_WITH_SCHEMA:
        return {**rest, "response_format": {"type": "json_object", "schema": schema_of(requested)}}
    if form == JSON_OBJECT:
        return {**rest, "response_format": {"type": "json_object"}}
    return rest


def refuses_format(status: int | None, message: str) -> bool:
    """Whether an answer (its HTTP status and the server's message) refuses the structured-output form."""
    return status in (400, 422, 500) and any(word in message.lower() for word in _FORMAT_WORDS)


class FormatLadder:
    """The form an OpenAI-compatible server gets, stepping down on refusals until one request succeeds.

    form, settled: where to start (a ``--batch`` run's state carries them from round to round).
    """

    def __init__(
        self, server: str, forms: tuple[str, ...] = OPENAI_LADDER, form: str | None = None, settled: bool = False
    ) -> None:
        self._server = server
        self._forms = forms
        self._step = forms.index(form) if form is not None else 0
        self.settled = settled

    @property
    def form(self) -> str:
        return self._forms[self._step]

    def is_refusal(self, response: httpx.Response) -> bool:
        """An answer refusing the structured-output form, while the form is not settled yet."""
        return not self.settled and refuses_format(response.status_code, server_message(response))

    def refused(self, form: str) -> bool:
        """After a refusal of ``form``: whether to send the request again, in the form now current."""
        if form != self.form:
            return True  # another request already stepped down: resend in the current form
        if self._step == len(self._forms) - 1:
            return False
        self._step += 1
        logger.warning("%s refused response_format as %s; now sending %s", self._server, form, self.form)
        return True

    def succeeded(self, form: str) -> None:
        if form == self.form:
            self.settled = True
