"""The card's images: the retention distribution of a run's merges, and acceptance against α and retention."""

from __future__ import annotations

import io
from collections.abc import Sequence

from mergeit_hf.output.sweep import SweepTable

RETENTION_FIGURE = "retention.png"
SWEEP_FIGURE = "sweep.png"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no screen on a server; set before pyplot is imported
    import matplotlib.pyplot as plt

    return plt


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(figure)
    return buffer.getvalue()


def retention_figure(
    retention_a: Sequence[float], retention_b: Sequence[float], statuses: Sequence[str], min_retention: float
) -> bytes:
    """Histogram of each scored merge's weaker-side retention, accepted and rejected stacked."""
    plt = _pyplot()
    weaker = [min(a, b) for a, b in zip(retention_a, retention_b, strict=True)]
    accepted = [w for w, s in zip(weaker, statuses, strict=True) if s == "accepted"]
    rejected = [w for w, s in zip(weaker, statuses, strict=True) if s != "accepted"]
    figure, axes = plt.subplots(figsize=(6, 3.2))
    bins = [i / 20 for i in range(21)]
    axes.hist(
        [accepted, rejected], bins=bins, stacked=True, label=["accepted", "rejected"], color=["#2a9d8f", "#e76f51"]
    )
    axes.axvline(min_retention, color="black", linestyle="--", label=f"min_retention = {min_retention:.2f}")
    axes.set_xlabel("retention of the weaker source, min(retention_a, retention_b)")
    axes.set_ylabel("merges")
    axes.set_xlim(0, 1)
    axes.legend(fontsize=8)
    axes.set_title(f"Retention of {len(weaker)} scored merges")
    return _png(figure)


def sweep_figure(table: SweepTable) -> bytes:
    """Acceptance rate against α, one line per min_retention, the run's own setting marked."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6, 3.4))
    for min_retention in table.retentions:
        rates = [table.rate(alpha, min_retention) for alpha in table.alphas]
        axes.plot(table.alphas, rates, marker="o", markersize=3, label=f"min_retention {min_retention:.2f}")
    if table.current is not None:
        alpha, min_retention = table.current
        axes.scatter([alpha], [table.rate(alpha, min_retention)], s=80, facecolors="none", edgecolors="black")
    axes.set_xlabel("α (accept if q(merged) > α·(q(a)+q(b)))")
    axes.set_ylabel("acceptance rate")
    axes.set_ylim(-0.02, 1.02)
    axes.legend(fontsize=7, ncol=2)
    axes.set_title(f"Acceptance of {table.n_scored} scored pairs (circle: this run's setting)")
    return _png(figure)
