"""Re-gate a finished run from its stored scores: ``mergeit sweep`` and ``mergeit regate``, no LLM request.

Every scored pair keeps each gate attempt's quality and retentions in ``mergeit/pairs.parquet``
(``attempt_log``), so the gate can be applied again with other thresholds exactly as the run would have
applied them to the merges it made. A stricter setting cannot see merges that were never requested (a
run with ``gate_retries`` stops retrying at the first accepted merge): those are the ones
the sweep cannot count.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from datasets import Dataset

from mergeit_hf.assemble import ACCOUNTING_FEATURES, final_dataset, pair_rows
from mergeit_hf.card import RunRecord
from mergeit_hf.errors import InputError
from mergeit_hf.gate import AttemptScores, best_attempt

DEFAULT_ALPHAS = (0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9)
DEFAULT_RETENTIONS = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7)
SCORED = ("accepted", "rejected")
REQUIRED_COLUMNS = ("merge_status", "quality_a", "quality_b", "attempt_log")


@dataclass(frozen=True)
class ScoredPair:
    """What the gate needs of one pair: its sources' qualities and every attempt's scores."""

    qualities: tuple[float, ...]  # one per source: a, b, then a group's further sources
    attempts: tuple[AttemptScores, ...]


@dataclass(frozen=True)
class SweepTable:
    """Accepted pairs for every (α, min_retention) on a grid, from stored scores."""

    alphas: tuple[float, ...]
    retentions: tuple[float, ...]
    accepted: dict[tuple[float, float], int]
    n_scored: int
    current: tuple[float, float] | None = None

    def rate(self, alpha: float, min_retention: float) -> float:
        return self.accepted[(alpha, min_retention)] / self.n_scored if self.n_scored else 0.0

    def _cell(self, alpha: float, min_retention: float) -> str:
        mark = " ←" if self.current == (alpha, min_retention) else ""
        return f"{self.accepted[(alpha, min_retention)]} ({self.rate(alpha, min_retention):.0%}){mark}"

    def render(self) -> str:
        head = "| α | " + " | ".join(f"min_retention {r:.2f}" for r in self.retentions) + " |"
        lines = [head, "|---" * (len(self.retentions) + 1) + "|"]
        for alpha in self.alphas:
            cells = [self._cell(alpha, r) for r in self.retentions]
            lines.append(f"| {alpha:.2f} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def scored_pairs(pairs: Dataset) -> list[ScoredPair]:
    """The pairs the gate decided (accepted or rejected), with every attempt that was scored."""
    found = []
    more = pairs["quality_more"] if "quality_more" in pairs.column_names else [[]] * len(pairs)
    for status, qa, qb, rest, log in zip(
        pairs["merge_status"], pairs["quality_a"], pairs["quality_b"], more, pairs["attempt_log"], strict=True
    ):
        if status in SCORED:
            found.append(ScoredPair((qa, qb, *(rest or ())), _attempt_scores(json.loads(log))))
    return found


def _attempt_scores(log: list[dict[str, Any]]) -> tuple[AttemptScores, ...]:
    return tuple(
        AttemptScores(a["quality_merged"], tuple(a["retentions"]), tuple(tuple(x) for x in a["lost"] or ()))
        for a in log
        if a.get("quality_merged") is not None
    )


def sweep(
    pairs: Sequence[ScoredPair],
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    retentions: Sequence[float] = DEFAULT_RETENTIONS,
    current: tuple[float, float] | None = None,
) -> SweepTable:
    grid = [(alpha, r) for alpha in alphas for r in retentions]
    if current is not None and current not in grid:
        alphas, retentions = sorted({*alphas, current[0]}), sorted({*retentions, current[1]})
        grid = [(alpha, r) for alpha in alphas for r in retentions]
    accepted = {(alpha, r): sum(_accepted(pair, alpha, r) for pair in pairs) for alpha, r in grid}
    return SweepTable(tuple(alphas), tuple(retentions), accepted, len(pairs), current)


def _accepted(pair: ScoredPair, alpha: float, min_retention: float) -> bool:
    chosen = best_attempt(pair.attempts, pair.qualities, alpha, min_retention)
    return chosen is not None and chosen[1].accepted


# -- the output folder --------------------------------------------------------------------------------


@dataclass
class OutputFolder:
    """A ``mergeit run`` output folder, read back: record, final rows, pairs and accounting."""

    folder: Path
    record: RunRecord
    final: Dataset
    pairs: Dataset
    accounting: Dataset

    @classmethod
    def open(cls, folder: str | Path) -> OutputFolder:
        from mergeit_hf.pipeline import read_parquet

        folder = Path(folder)
        extras = folder / "mergeit"
        needed = [extras / "run.json", extras / "pairs.parquet", extras / "accounting.parquet"]
        missing = [str(p.relative_to(folder)) for p in needed if not p.is_file()]
        if missing:
            raise InputError(
                f"{folder} is not a mergeit output folder (missing {missing}); give the --output of `mergeit run`"
            )
        pairs = read_parquet([extras / "pairs.parquet"])
        lacking = [c for c in REQUIRED_COLUMNS if c not in pairs.column_names]
        if lacking:
            raise InputError(
                f"{folder}/mergeit/pairs.parquet lacks the scores to re-gate ({lacking} missing): it was written by a "
                "dry run or an older mergeit-hf; run `mergeit run` again (cached requests are not re-sent)"
            )
        final = read_parquet(sorted((folder / "data").glob("train-*.parquet")))
        return cls(
            folder, RunRecord.load(extras / "run.json"), final, pairs, read_parquet([extras / "accounting.parquet"])
        )

    @property
    def thresholds(self) -> tuple[float, float]:
        config = self.record.config
        return float(config["alpha"]), float(config.get("min_retention", 0.0))


def regate_pairs(pairs: Dataset, alpha: float, min_retention: float) -> Dataset:
    """Decide every scored pair again; the kept attempt's merge and scores replace the columns."""
    rows = pairs.to_list()
    for row in rows:
        if row["merge_status"] not in SCORED:
            continue
        log = json.loads(row["attempt_log"])
        scored = [a for a in log if a.get("quality_merged") is not None]
        attempts = _attempt_scores(scored)
        qualities = (row["quality_a"], row["quality_b"], *(row.get("quality_more") or ()))
        index, decision = best_attempt(attempts, qualities, alpha, min_retention)
        kept = scored[index]
        row.update(
            merge_status="accepted" if decision.accepted else "rejected",
            merge_reason=decision.reason,
            rejection_cause=decision.cause or "",
            quality_merged=kept["quality_merged"],
            retention_a=kept["retentions"][0],
            retention_b=kept["retentions"][1],
            **({"retention_more": kept["retentions"][2:]} if "retention_more" in row else {}),
            merged_instruction=kept["merged"]["instruction"],
            merged_input=kept["merged"]["input"],
            merged_output=kept["merged"]["output"],
            merged_at=kept["completed_at"],
        )
    for row in rows:
        row.update(alpha=alpha, min_retention=min_retention)
    return Dataset.from_list(rows, features=pairs.features)


def regate_folder(folder: str | Path, alpha: float, min_retention: float) -> OutputFolder:
    """Rewrite data, pairs, accounting, run record and card of ``folder`` for new thresholds."""
    return regate_output(OutputFolder.open(folder), alpha, min_retention)


def regate_output(out: OutputFolder, alpha: float, min_retention: float) -> OutputFolder:
    """``regate_folder`` on a folder already read (the CLI reads it once, for its thresholds too)."""
    from mergeit_hf.pipeline import write_output

    pairs = regate_pairs(out.pairs, alpha, min_retention)
    created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    rows, fate = pair_rows(pairs, created_at, out.record.version)
    rows += [row for row in out.final.to_list() if row["merge_status"] == "unpaired"]
    final = final_dataset(rows)
    accounting = _accounting_again(out.accounting, fate)
    statuses = Counter(pairs["merge_status"])
    counts = dict(out.record.counts)
    counts.update(
        {
            "merges accepted": statuses.get("accepted", 0),
            "merges rejected": statuses.get("rejected", 0),
            "final rows": len(final),
        }
    )
    record = dataclasses.replace(
        out.record,
        config={**out.record.config, "alpha": alpha, "min_retention": min_retention},
        counts=counts,
        rejection_causes=dict(Counter(c for c in pairs["rejection_cause"] if c)),
        regated_at=created_at,
    )
    write_output(out.folder, final, pairs, accounting, record)
    return OutputFolder(out.folder, record, final, pairs, accounting)


def _accounting_again(accounting: Dataset, fate: dict[str, tuple[str, str, str | None]]) -> Dataset:
    rows = accounting.to_list()
    for row in rows:
        if row["id"] in fate:
            row["fate"], row["detail"], row["output_id"] = fate[row["id"]]
    return Dataset.from_list(rows, features=ACCOUNTING_FEATURES)
