"""Open the backend for an endpoint as configured: a server at a URL (probed first: TGI, or an
OpenAI-compatible server), HF Inference Providers, or llama.cpp in this process."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mergeit_hf.endpoints.base import ChatBackend
from mergeit_hf.endpoints.http.client import JsonHttpClient
from mergeit_hf.endpoints.http.transport import api_key, base_url
from mergeit_hf.endpoints.probe import ServerInfo, probe_server
from mergeit_hf.endpoints.servers.completions import CompletionEndpointBackend
from mergeit_hf.endpoints.servers.hf_inference import InferenceClientBackend, provider_backend
from mergeit_hf.endpoints.servers.local_llama import LocalLlamaBackend
from mergeit_hf.endpoints.servers.openai_chat import OpenAIChatBackend


@dataclass(frozen=True)
class EndpointSettings:
    """One endpoint as the user configured it; the key is read from ``key_variable`` when it is opened."""

    url: str | None = None
    model: str | None = None
    provider: str | None = None
    key_variable: str = "MERGEIT_API_KEY"
    role: str = "LLM endpoint"
    timeout_s: float = 120.0
    attempts: int = 6

    @property
    def options(self) -> dict[str, Any]:
        """What every client of this endpoint takes: timeout, attempts, and where its key comes from."""
        return {"timeout_s": self.timeout_s, "attempts": self.attempts, "key_variable": self.key_variable}

    async def probe(self, url: str, key: str | None) -> ServerInfo:
        return await probe_server(url, key, self.role, self.timeout_s, model=self.model, key_variable=self.key_variable)


async def open_chat_backend(settings: EndpointSettings, local_model: str | None = None) -> ChatBackend:
    """Probe and open the chat backend: a URL's server, a provider, else the embedded model."""
    if settings.provider:
        return provider_backend(settings.provider, settings.model, api_key(settings.key_variable), **settings.options)
    if settings.url:
        url, key = base_url(settings.url), api_key(settings.key_variable)
        server = await settings.probe(url, key)
        if server.dialect == "tgi":
            return InferenceClientBackend.for_tgi(url, server, key, **settings.options)
        return OpenAIChatBackend(url, server, JsonHttpClient(url, key, **settings.options))
    local = LocalLlamaBackend(local_model)
    await local.probe()
    return local


async def open_completion_backend(settings: EndpointSettings) -> CompletionEndpointBackend:
    """Probe and open a scorer endpoint answering raw completions."""
    url, key = base_url(settings.url or ""), api_key(settings.key_variable)
    server = await settings.probe(url, key)
    return CompletionEndpointBackend(url, server, JsonHttpClient(url, key, **settings.options))
