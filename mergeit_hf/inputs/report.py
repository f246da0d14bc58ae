"""What reading a source found: every record read is a row, or a counted, explained drop."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field


@dataclass(frozen=True)
class DroppedRow:
    """An input row that is not in the output, and why."""

    source_index: int
    reason: str
    detail: str = ""
    id: str | None = None


@dataclass
class LoadReport:
    """What reading one source found: counts that explain every input record."""

    source: str
    input_format: str
    records_read: int = 0
    rows_extracted: int = 0
    dropped: list[DroppedRow] = field(default_factory=list)
    unreadable_bytes: int = 0
    unreadable_detail: str = ""

    @property
    def rows_valid(self) -> int:
        return self.rows_extracted - len(self.dropped)

    @property
    def drop_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(d.reason for d in self.dropped).items()))

    @property
    def complete(self) -> bool:
        """False when part of the source could not be read at all."""
        return self.unreadable_bytes == 0 and not self.unreadable_detail

    def summary(self) -> str:
        lines = [
            f"{self.source}: {self.records_read} records read as {self.input_format}, "
            f"{self.rows_extracted} rows, {self.rows_valid} valid"
        ]
        lines += [f"  dropped {count}: {reason}" for reason, count in self.drop_counts.items()]
        if not self.complete:
            lines.append(f"  NOT READ: {self.unreadable_bytes} bytes ({self.unreadable_detail})")
        return "\n".join(lines)


def content_id(*parts: str) -> str:
    """Stable id of a row without one: a hash of its content, identical across runs and machines."""
    payload = "\x1f".join(parts).encode("utf-8")
    return hashlib.sha256(payload).hexdigest()[:16]
