"""The providers' limits on one batch, in one place (OpenAI's Batch API guide: 50,000 requests and 200 MB an
input file; a 24 h completion window; enqueued tokens are per model and tier, so the user states them)."""

from __future__ import annotations

from dataclasses import dataclass

MAX_REQUESTS_PER_FILE = 50_000
MAX_BYTES_PER_FILE = 200 * 1024 * 1024
COMPLETION_WINDOW = "24h"
#: ASCII bytes of a JSON line per estimated input token. Tokenizers read about 4 characters of English or
#: code a token; 3 bytes of the whole line (keys, schema and escapes included) count more than they do.
BYTES_PER_TOKEN = 3


def estimated_tokens(line: bytes) -> int:
    """An upper estimate of the input tokens the provider counts for one batch line: a token per 3 ASCII
    bytes, and one per byte of non-ASCII text (a byte-level BPE tokenizer never needs more for it)."""
    non_ascii = 0 if line.isascii() else len(line) - len(line.decode("utf-8").encode("ascii", "ignore"))
    return -(-(len(line) - non_ascii) // BYTES_PER_TOKEN) + non_ascii


@dataclass(frozen=True)
class BatchLimits:
    """Where a round's requests are split into several files (each its own batch).

    max_tokens: the enqueued-token limit (``batch_enqueued_tokens``); None splits for requests and bytes only.
    With it, the files of a round are run one after another (``sequential``), so the queue holds one at a time.
    """

    max_requests: int = MAX_REQUESTS_PER_FILE
    max_bytes: int = MAX_BYTES_PER_FILE
    max_tokens: int | None = None

    @property
    def sequential(self) -> bool:
        return self.max_tokens is not None

    def split(self, lines: list[bytes]) -> list[list[bytes]]:
        """The lines (each one JSON line, newline included) in files within every limit, in order."""
        files: list[list[bytes]] = []
        size = tokens = 0
        for line in lines:
            line_tokens = estimated_tokens(line)
            self._check_alone(line, line_tokens)
            over_tokens = self.max_tokens is not None and tokens + line_tokens > self.max_tokens
            if not files or len(files[-1]) >= self.max_requests or size + len(line) > self.max_bytes or over_tokens:
                files.append([])
                size = tokens = 0
            files[-1].append(line)
            size += len(line)
            tokens += line_tokens
        return files

    def _check_alone(self, line: bytes, line_tokens: int) -> None:
        if len(line) > self.max_bytes:
            raise ValueError(f"one batch request is {len(line):,} bytes, above the {self.max_bytes:,} a file holds")
        if self.max_tokens is not None and line_tokens > self.max_tokens:
            raise ValueError(
                f"one batch request is about {line_tokens:,} tokens, above batch_enqueued_tokens "
                f"({self.max_tokens:,}): set it to your tier's limit for the model"
            )
