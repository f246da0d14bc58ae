"""Texts from concurrent merges embedded together, off the event loop.

Every scored merge needs its sources and merged passages embedded for retention. One forward pass per
merge costs the per-call overhead of the model every time and, on a CPU, is what limits stage 2 long
before a server's slots do. Here merges queue their texts; one worker thread embeds everything queued
since its last pass in a single call, so the busier stage 2 gets, the larger (and cheaper per text) the
passes become. Identical texts in one pass are embedded once.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np

from mergeit_hf.embeddings.embedder import Embedder


@dataclass
class EmbeddingBatcher:
    """``await batcher.encode(texts)``: L2-normalised vectors, from passes shared with other callers."""

    embedder: Embedder
    max_texts: int = 512  # one pass never takes more, so a waiting merge is never starved for long
    _queue: list[tuple[list[str], asyncio.Future]] = field(default_factory=list)
    _worker: asyncio.Task | None = None

    async def encode(self, texts: list[str]) -> np.ndarray:
        future = asyncio.get_running_loop().create_future()
        self._queue.append((texts, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.ensure_future(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._queue:
            batch = self._take()
            unique = list(dict.fromkeys(text for texts, _ in batch for text in texts))
            try:
                vectors = await asyncio.to_thread(self.embedder.encode, unique)
            except Exception as exc:  # every waiting merge sees the model's own error
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            row = {text: i for i, text in enumerate(unique)}
            for texts, future in batch:
                if not future.done():
                    future.set_result(vectors[[row[text] for text in texts]])

    def _take(self) -> list[tuple[list[str], asyncio.Future]]:
        taken, size = [], 0
        while self._queue and (not taken or size + len(self._queue[0][0]) <= self.max_texts):
            texts, future = self._queue.pop(0)
            taken.append((texts, future))
            size += len(texts)
        return taken
