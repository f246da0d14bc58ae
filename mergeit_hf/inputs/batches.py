"""A batch as ``Dataset.map(batched=True)`` and ``Dataset.iter`` give it (a dict of columns), as rows."""

from __future__ import annotations

from typing import Any


def batch_rows(batch: dict[str, list]) -> list[dict[str, Any]]:
    """The batch's rows, each a dict of every column (in the batch's column order)."""
    return [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
