"""OpenAI-compatible chat servers: vLLM, SGLang, llama.cpp's servers, OpenAI and every API that copies it.

``/v1/chat/completions`` as OpenAI specifies it, through our own httpx client: huggingface_hub's client
would send a placeholder model name (vLLM and SGLang answer 404) and rewrite ``json_schema`` into TGI's
grammar (OpenAI answers 400). Every request names the served model; the structured-output form is
settled by the first answers (``structured_output``).
"""

from __future__ import annotations

from typing import Any

from mergeit_hf.endpoints.base import ChatReply, reply_from_chat_completion
from mergeit_hf.endpoints.http.client import JsonHttpClient
from mergeit_hf.endpoints.probe import ServerInfo, model_label
from mergeit_hf.endpoints.servers.served import ServedBackend
from mergeit_hf.endpoints.structured_output import FormatLadder, in_form

CHAT_ROUTE = "/v1/chat/completions"


class OpenAIChatBackend(ServedBackend):
    """One OpenAI-compatible server, probed (``server``) before the first request."""

    kind = "openai-compatible"

    def __init__(self, url: str, server: ServerInfo, http: JsonHttpClient) -> None:
        super().__init__(url, server, http)
        self._formats = FormatLadder(url)

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIChatBackend(url={self.url!r}, model={self.model_id!r})"

    def describe(self) -> dict[str, str]:
        return {"kind": self.kind, "model": model_label(self.model_id), "structured_output": self._formats.form}

    def start_form(self, form: str) -> None:
        """Write response_format in ``form`` from now on (a ``--batch`` round's lines, in the form earlier
        rounds' refusals stepped down to)."""
        self._formats = FormatLadder(self.url, form=form)

    def batch_line(self, messages: list[dict[str, str]], params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """The route and body of this request as a line of a batch file: what ``chat`` would post now."""
        return CHAT_ROUTE, {"model": self.model_id, "messages": messages, **in_form(params, self._formats.form)}

    async def chat(self, messages: list[dict[str, str]], params: dict[str, Any]) -> ChatReply:
        formatted = "response_format" in params
        while True:
            form = self._formats.form
            body = {"model": self.model_id, "messages": messages, **in_form(params, form)}
            answered = self._formats.is_refusal if formatted else None
            posted = await self._http.post(CHAT_ROUTE, body, answered, read=reply_from_chat_completion)
            if formatted and self._formats.is_refusal(posted.response) and self._formats.refused(form):
                continue
            self._http.check(CHAT_ROUTE, posted.response)
            assert posted.value is not None  # a success is read, or raised as malformed
            if "response_format" in params:
                self._formats.succeeded(form)
            return posted.value
