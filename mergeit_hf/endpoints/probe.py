"""What a server says of itself before the first request: its kind (dialect), the model every request must
name, and how many requests it takes at once. A wrong key or an ambiguous model stops the run here.

Sizes servers announce: TGI's ``/info`` (``max_concurrent_requests``: it refuses more), SGLang's
``/get_server_info`` (``max_running_requests``), llama.cpp's ``/props`` (``total_slots``); vLLM's
``/metrics`` gives a hint only (``kv_cache_max_concurrency``: how many full-length sequences fit its cache;
it runs more of shorter ones), a starting point the adaptive limit moves from. Nothing announced: the limit
starts at 8 and finds the server's capacity (``sending.limit``); where ``/metrics`` counts the requests
running and waiting (vLLM's), the session reads them while it sends (``servers.queue_watch``)."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import PurePath
from typing import Literal, NamedTuple

import httpx

from mergeit_hf.endpoints.base import DEFAULT_CONCURRENCY
from mergeit_hf.endpoints.http.transport import configuration_error, redact, server_message
from mergeit_hf.errors import EndpointConfigError, EndpointError

#: "tgi": TGI (answers ``/info``; structured output as TGI's grammar). "openai": everything else that serves
#: ``/v1/models`` and ``/v1/chat/completions`` (vLLM, SGLang, llama.cpp's servers, OpenAI-compatible APIs).
Dialect = Literal["tgi", "openai"]
_PROBE_CONNECT_TIMEOUT_S = 10.0
_KV_CONCURRENCY = re.compile(r'kv_cache_max_concurrency="([0-9.]+)"')
_QUEUE_GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting")
_GENERATED_COUNTER = "vllm:generation_tokens_total"  # tokens generated since the server started


@dataclass(frozen=True)
class ServerInfo:
    """The model every request names (never a placeholder), the server's concurrency and its dialect."""

    model: str
    concurrency: int  # what the server announced, else where the adaptive limit starts
    dialect: Dialect
    listed: tuple[str, ...] = ()  # the models ``/v1/models`` listed
    announced: bool = False  # the server said its size: the limit is fixed there
    queue_metrics: bool = False  # its /metrics counts requests running and waiting (vLLM)


def model_label(name: str) -> str:
    """The model as a card may show it: a local file path (llama.cpp reports its GGUF path) becomes its file
    name, so a published card never carries the user's folders; a Hub id stays as it is."""
    path_like = name.startswith(("/", "~", "./", "../", "\\")) or (len(name) > 2 and name[1:3] in (":\\", ":/"))
    if path_like or name.endswith((".gguf", ".bin", ".safetensors")):
        return PurePath(name.replace("\\", "/")).name
    return name


async def probe_server(
    url: str,
    key: str | None,
    role: str,
    read_timeout_s: float,
    *,
    model: str | None = None,
    key_variable: str = "MERGEIT_API_KEY",
) -> ServerInfo:
    """Fail fast on an unreachable server, a refused key or an unknown model; read dialect, model and concurrency.

    Connecting fails within seconds, but an answer may take as long as any request: llama.cpp's
    one-slot server answers ``/v1/models`` only after the generation it is running (another client's,
    or one this run abandoned on a timeout), so a short read timeout would call a busy server dead.
    """
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    timeout = httpx.Timeout(read_timeout_s, connect=_PROBE_CONNECT_TIMEOUT_S)
    async with httpx.AsyncClient(timeout=timeout, headers=headers) as http:
        info = await _probe_get(http, f"{url}/info", role, key)
        _check_key(info, url, key, key_variable)
        if info.status_code == 200 and "model_id" in _json(info):
            body = _json(info)
            concurrency = int(body.get("max_concurrent_requests") or DEFAULT_CONCURRENCY)
            announced = bool(body.get("max_concurrent_requests"))
            return ServerInfo(model or str(body["model_id"]), concurrency, "tgi", announced=announced)
        models = await _probe_get(http, f"{url}/v1/models", role, key)
        _check_key(models, url, key, key_variable)
        listed = _listed(models) if models.status_code == 200 else ()
        chosen = _choose_model(url, role, model, listed)
        return await _sized(http, url, ServerInfo(chosen, DEFAULT_CONCURRENCY, "openai", listed))


async def _sized(http: httpx.AsyncClient, url: str, server: ServerInfo) -> ServerInfo:
    """``server`` with what an OpenAI-compatible server says of its size, if anything."""
    for route, field in (("/get_server_info", "max_running_requests"), ("/props", "total_slots")):
        said = _json(await _quiet_get(http, url + route)).get(field)
        if isinstance(said, int) and said > 0:
            return replace(server, concurrency=said, announced=True)
    metrics = await _quiet_get(http, url + "/metrics")
    text = metrics.text if metrics.status_code == 200 else ""
    hint = _KV_CONCURRENCY.search(text)
    start = max(DEFAULT_CONCURRENCY, int(float(hint.group(1)))) if hint else DEFAULT_CONCURRENCY
    return replace(server, concurrency=start, queue_metrics=read_queue(text) is not None)


class ServerQueue(NamedTuple):
    """What vLLM's ``/metrics`` counts now, summed over its engines."""

    running: float
    waiting: float
    generated_tokens: float | None = None  # None: the text has no such counter


def read_queue(metrics: str) -> ServerQueue | None:
    """Requests running and waiting, and tokens generated so far, from a Prometheus text that has vLLM's
    gauges (summed over their label sets); None without the gauges."""
    counts = {name: 0.0 for name in (*_QUEUE_GAUGES, _GENERATED_COUNTER)}
    seen: set[str] = set()
    for line in metrics.splitlines():
        name, _, rest = line.partition("{")
        if "}" in rest:  # labels, then the value (and perhaps a timestamp)
            rest = rest.split("}", 1)[1]
        else:
            name, _, rest = line.partition(" ")
        name = name.strip()
        if name in counts and rest.split():
            try:
                counts[name] += float(rest.split()[0])
            except ValueError:
                continue
            seen.add(name)
    if not seen & set(_QUEUE_GAUGES):
        return None
    generated = counts[_GENERATED_COUNTER] if _GENERATED_COUNTER in seen else None
    return ServerQueue(counts[_QUEUE_GAUGES[0]], counts[_QUEUE_GAUGES[1]], generated)


async def _quiet_get(http: httpx.AsyncClient, address: str) -> httpx.Response:
    """A GET whose absence is an answer (most servers have none of these routes)."""
    try:
        return await http.get(address)
    except httpx.HTTPError:
        return httpx.Response(599)


def _choose_model(url: str, role: str, model: str | None, listed: tuple[str, ...]) -> str:
    flag = "--scorer-model" if role.startswith("scorer") else "--model"
    if model:
        if listed and model not in listed:
            raise EndpointConfigError(
                f"the {role} {url} serves {list(listed)}, not {model!r}: pass one of them as {flag}"
            )
        return model
    if len(listed) == 1:
        return listed[0]
    if listed:
        raise EndpointConfigError(f"the {role} {url} serves several models {list(listed)}: choose one with {flag}")
    raise EndpointConfigError(
        f"the {role} {url} names no model (no /info, no /v1/models list): give the model to request with {flag}"
    )


def _check_key(response: httpx.Response, url: str, key: str | None, key_variable: str) -> None:
    if response.status_code in (401, 403):
        said = redact(server_message(response), key)
        raise configuration_error(url, response.status_code, said, key_variable)


def _json(response: httpx.Response) -> dict:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _listed(response: httpx.Response) -> tuple[str, ...]:
    data = _json(response).get("data") or []
    return tuple(str(entry["id"]) for entry in data if isinstance(entry, dict) and entry.get("id"))


async def _probe_get(http: httpx.AsyncClient, address: str, role: str, key: str | None) -> httpx.Response:
    try:
        return await http.get(address)
    except httpx.TransportError as exc:
        what = "did not answer" if isinstance(exc, httpx.TimeoutException) else "cannot reach"
        raise EndpointError(
            f"{what} the {role} {address} ({type(exc).__name__}: {redact(str(exc), key) or 'no detail'}); "
            "is it running, and is request_timeout_s long enough for it to finish its current work?"
        ) from None
