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
from datetime import datetime, timezone
from pathlib import Path

from datasets import Dataset, Features

from mergeit_hf.output.assemble import ACCOUNTING_FEATURES
from mergeit_hf.output.final_rows import final_dataset, pair_rows
from mergeit_hf.output.folder import OutputFolder, write_output
from mergeit_hf.output.sweep import SCORED, attempt_scores, require_measured, scored_pairs
from mergeit_hf.stage2.gate import best_attempt
from mergeit_hf.stage2.merge.columns import COMPLEXITY_FEATURES, OUTCOME_FEATURES
from mergeit_hf.stage2.merge.results import OutcomeCounts


def regate_pairs(pairs: Dataset, alpha: float, min_retention: float, min_judge: float | None = None) -> Dataset:
    """Decide every scored pair again; the kept attempt's merge and scores replace the columns.
    ``min_judge`` None leaves the judge out of the gate."""
    rows = pairs.to_list()
    for row in rows:
        if row["merge_status"] not in SCORED:
            continue
        log = json.loads(row["attempt_log"])
        scored = [a for a in log if a.get("quality_merged") is not None]
        attempts = attempt_scores(scored)
        qualities = (row["quality_a"], row["quality_b"], *(row.get("quality_more") or ()))
        index, decision = best_attempt(attempts, qualities, alpha, min_retention, min_judge)
        kept, kept_scores = scored[index], attempts[index]
        retentions = kept.get("retentions") or []  # empty when the run measured no retention
        row.update(
            merge_status="accepted" if decision.accepted else "rejected",
            merge_reason=decision.reason,
            rejection_cause=decision.cause or "",
            quality_merged=kept["quality_merged"],
            retention_a=retentions[0] if retentions else None,
            retention_b=retentions[1] if retentions else None,
            **({"retention_more": retentions[2:]} if "retention_more" in row else {}),
            **_part_columns(row, kept_scores.parts),
            judge_p_yes=kept_scores.judge,
            merged_instruction=kept["merged"]["instruction"],
            merged_input=kept["merged"]["input"],
            merged_output=kept["merged"]["output"],
            merged_at=kept["completed_at"],
        )
    for row in rows:
        row.update(alpha=alpha, min_retention=min_retention, min_judge=min_judge)
    return Dataset.from_list(rows, features=_declared(pairs.features))


def _declared(features: Features) -> Features:
    """The pairs' types with every outcome column as declared: a folder written before the outcome columns
    had declared types may hold null-typed ones (a run without the judge: ``min_judge``, ``judge_p_yes``)."""
    declared = {**COMPLEXITY_FEATURES, **OUTCOME_FEATURES}
    return Features({name: declared.get(name, feature) for name, feature in features.items()})


def _part_columns(row: dict, parts: tuple[tuple[float, float], ...]) -> dict:
    """The kept attempt's retention parts, for the columns this folder has (older folders have none)."""
    values = {
        f"retention_{side}_{part}": parts[i][j] if len(parts) > i else None
        for i, side in enumerate("ab")
        for j, part in enumerate(("question", "answer"))
    }
    values["retention_more_question"] = [q for q, _ in parts[2:]]
    values["retention_more_answer"] = [a for _, a in parts[2:]]
    return {name: value for name, value in values.items() if name in row}


def regate_folder(
    folder: str | Path, alpha: float, min_retention: float, min_judge: float | None = None
) -> OutputFolder:
    """Rewrite data, pairs, accounting, run record and card of ``folder`` for new thresholds."""
    return regate_output(OutputFolder.open(folder), alpha, min_retention, min_judge)


def regate_output(
    out: OutputFolder, alpha: float, min_retention: float, min_judge: float | None = None
) -> OutputFolder:
    """``regate_folder`` on a folder already read (the CLI reads it once, for its thresholds too)."""
    require_measured(scored_pairs(out.pairs), min_judge, min_retention_given=False)
    pairs = regate_pairs(out.pairs, alpha, min_retention, min_judge)
    created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    rows, fate = pair_rows(pairs, created_at, out.record.version)
    rows += [row for row in out.final.to_list() if row["merge_status"] == "unpaired"]
    final = final_dataset(rows)
    accounting = _accounting_again(out.accounting, fate)
    outcomes = OutcomeCounts.of_pairs(pairs)
    counts = {**out.record.counts, **outcomes.lines(), "final rows": len(final)}
    record = dataclasses.replace(
        out.record,
        config={**out.record.config, "alpha": alpha, "min_retention": min_retention, **_judge_config(min_judge)},
        counts=counts,
        rejection_causes=outcomes.rejection_causes,
        regated_at=created_at,
    )
    write_output(out.folder, final, pairs, accounting, record)
    return OutputFolder(out.folder, record, final, pairs, accounting)


def _judge_config(min_judge: float | None) -> dict:
    return {"judge": False} if min_judge is None else {"judge": True, "min_judge": min_judge}


def _accounting_again(accounting: Dataset, fate: dict[str, tuple[str, str, str | None]]) -> Dataset:
    rows = accounting.to_list()
    for row in rows:
        if row["id"] in fate:
            row["fate"], row["detail"], row["output_id"] = fate[row["id"]]
    return Dataset.from_list(rows, features=ACCOUNTING_FEATURES)
