"""Optional stage 0, as the authors' scripts do: keep the rows Deita rates best before clustering.

Every valid row has Deita's quality score (instruction + input, output) and complexity score
(instruction + input), from the stage 2 scorer (``stage2.row_scores``), and only the ``prefilter_top`` rows
with the highest quality × complexity go on to stage 1 (the authors kept 35k of Alpaca's 52k). Every other
row is accounted for as ``prefiltered``, with its product and the cutoff.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from datasets import Dataset

from mergeit_hf.inputs.loading import DroppedRow

PREFILTER_REASON = "prefilter"


@dataclass
class PrefilterResult:
    """The rows kept (with ``quality`` and ``complexity`` columns) and the rows left out, with why."""

    kept: Dataset
    dropped: list[DroppedRow]
    cutoff: float  # the smallest quality × complexity kept
    requests_sent: int

    @property
    def n_dropped(self) -> int:
        return len(self.dropped)

    def summary(self) -> str:
        return (
            f"prefilter: kept {len(self.kept)} rows with quality × complexity >= {self.cutoff:.2f}, "
            f"left out {self.n_dropped}"
        )


def prefilter_count(top: int | float, n_rows: int) -> int:
    """How many rows a ``prefilter_top`` keeps: a count, or a fraction of the valid rows."""
    wanted = top if isinstance(top, int) else round(top * n_rows)
    return max(1, min(int(wanted), n_rows))


def prefilter(
    rows: Dataset, quality: Sequence[float], complexity: Sequence[float], top: int | float, requests_sent: int = 0
) -> PrefilterResult:
    """Keep the ``top`` rows by quality × complexity (ties: input order); ``requests_sent`` is what scoring cost."""
    product = np.asarray(quality) * np.asarray(complexity)
    keep_n = prefilter_count(top, len(rows))
    order = np.argsort(-product, kind="stable")
    kept = np.sort(order[:keep_n])
    cutoff = float(product[order[keep_n - 1]])
    scored = rows.add_column("quality", list(quality)).add_column("complexity", list(complexity))
    left_out = np.sort(order[keep_n:])
    dropped = [
        DroppedRow(
            int(rows[int(i)]["source_index"]),
            PREFILTER_REASON,
            f"quality {quality[i]:.2f} × complexity {complexity[i]:.2f} = {product[i]:.2f} below the cutoff "
            f"{cutoff:.2f} (the top {keep_n} of {len(rows)} rows were kept)",
            rows[int(i)]["id"],
        )
        for i in left_out
    ]
    return PrefilterResult(scored.select(kept), dropped, cutoff, requests_sent)
