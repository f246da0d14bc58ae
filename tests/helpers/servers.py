"""Real servers for the tests: llama.cpp's OpenAI-compatible server, and a fault-injecting proxy."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from aiohttp import ClientSession, ClientTimeout, web

from mergeit_hf.endpoints.servers.local_llama import local_model_path


def wait_for_http(url: str, process, log, seconds: float = 120.0) -> None:
    """Until ``url`` answers 200; fails with the log's tail if ``process`` exits first."""
    import time

    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.5)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LlamaServer:
    """``python -m llama_cpp.server`` with the SmolLM2 GGUF on a free loopback port."""

    process: subprocess.Popen
    url: str
    log: Path

    @classmethod
    def start(cls, log_dir: Path, timeout_s: float = 120) -> LlamaServer:
        port = free_port()
        log = log_dir / f"llama-server-{port}.log"
        command = [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(local_model_path()),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            "4096",
            "--logits_all",
            "True",  # chat-completion logprobs need every position's logits
            "--interrupt_requests",
            "False",  # else a new request cancels the one being generated
        ]
        process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
        server = cls(process, f"http://127.0.0.1:{port}", log)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"llama.cpp server exited: {log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{server.url}/v1/models", timeout=2).status_code == 200:
                    return server
            except httpx.TransportError:
                time.sleep(0.3)
        server.stop()
        raise RuntimeError(f"llama.cpp server did not answer within {timeout_s}s")

    def wait_idle(self, timeout_s: float = 600) -> None:
        """Wait until the server has finished what earlier tests left it (abandoned requests still run).

        It answers ``/v1/models`` only between generations, so an answer means no work is in progress.
        """
        httpx.get(f"{self.url}/v1/models", timeout=timeout_s).raise_for_status()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


class LoopbackServer:
    """An aiohttp app on a free loopback port, served from its own thread; subclasses add ``routes``."""

    url: str = ""
    _loop: asyncio.AbstractEventLoop | None = None
    _runner: web.AppRunner | None = None

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    def start(self):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        ready = threading.Event()
        threading.Thread(target=self._serve, args=(port, ready), daemon=True).start()
        ready.wait(10)
        return self

    def _serve(self, port: int, ready: threading.Event) -> None:
        self._loop = asyncio.new_event_loop()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        self.routes(app)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", port).start())
        ready.set()
        self._loop.run_forever()

    def stop(self) -> None:
        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)


@dataclass
class FaultProxy(LoopbackServer):
    """An HTTP proxy in front of a real server that answers some requests with faults.

    ``faults`` is consumed one per chat-completion request: "429" (with Retry-After: 1), "503", "424",
    "drop" (close the connection without an answer), "slow" (wait ``slow_s`` before forwarding), or
    "ok". When the list is empty, requests pass through. ``forwarded`` counts the chat requests the real
    server received; ``seen`` counts every fault served.
    """

    upstream: str
    faults: list[str] = field(default_factory=list)
    slow_s: float = 3.0
    info: dict | None = None  # served at /info like TGI does; None passes /info through (llama.cpp: 404)
    forwarded: int = 0
    bodies: list[bytes] = field(default_factory=list)  # every chat request the real server answered
    arrivals: list[bytes] = field(default_factory=list)  # chat request bodies in the order they arrived
    active: int = 0  # chat requests being answered right now
    spans: list[tuple[float, float]] = field(default_factory=list)  # (start, end) of each answered chat request
    seen: Counter = field(default_factory=Counter)
    posted: list[tuple[str, bytes]] = field(default_factory=list)  # (path, body) of every POST, any route

    def routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/{tail:.*}", self._handle)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if request.method == "POST":
            self.posted.append((request.path, body))
        if request.path == "/info" and self.info is not None:
            return web.json_response(self.info)
        is_chat = request.path.endswith("/chat/completions")
        fault = self.faults.pop(0) if (is_chat and self.faults) else "ok"
        self.seen[fault] += 1
        if fault in {"429", "503", "424"}:
            headers = {"Retry-After": "1"} if fault == "429" else {}
            return web.json_response({"error": "Model is overloaded"}, status=int(fault), headers=headers)
        if fault == "drop":
            request.transport.close()
            raise ConnectionResetError("dropped on purpose")
        if fault == "slow":
            await asyncio.sleep(self.slow_s)
        self.active += is_chat
        if is_chat:
            self.arrivals.append(body)
        started = time.monotonic()
        try:
            return await self._forward(request, body, is_chat)
        finally:
            self.active -= is_chat
            if is_chat:
                self.spans.append((started, time.monotonic()))

    async def _forward(self, request: web.Request, body: bytes, is_chat: bool) -> web.Response:
        async with ClientSession(timeout=ClientTimeout(total=600)) as session:
            headers = {k: v for k, v in request.headers.items() if k.lower() not in {"host", "content-length"}}
            async with session.request(
                request.method, self.upstream + request.path_qs, data=body, headers=headers
            ) as upstream:
                payload = await upstream.read()
                if is_chat and upstream.status == 200:
                    self.forwarded += 1
                    self.bodies.append(body)
                return web.Response(body=payload, status=upstream.status, content_type=upstream.content_type)
