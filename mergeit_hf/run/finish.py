"""The end of a run, whatever ran the stages: the final dataset with provenance, the accounting of every
input row, the run record and the card (``finish``); the CLI's folder (``save``) and the Hub, data and card
in one commit (``publish_curated``).

``run_pipeline`` and the CLI end here, and so can a script that ran the stages itself with ``Dataset.map``:
``mi.finish(rows, merged)`` takes the rows with their ``selected`` column (or stage 1's result) and the
merged pairs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset
from huggingface_hub import DatasetCard

from mergeit_hf._version import __version__
from mergeit_hf.config import MergeItConfig
from mergeit_hf.embeddings.arrow import column_values
from mergeit_hf.endpoints.probe import model_label
from mergeit_hf.endpoints.sending.ledger import RequestLedger
from mergeit_hf.errors import InputError
from mergeit_hf.inputs.loading import LoadReport
from mergeit_hf.output.assemble import Assembly, assemble
from mergeit_hf.output.card import RunRecord
from mergeit_hf.output.folder import card_and_figures, pairs_for_export
from mergeit_hf.output.publish import push_to_hub, write_repo_folder
from mergeit_hf.progress import datasets_bars_off
from mergeit_hf.stage1.result import Stage1Result
from mergeit_hf.stage2.merge.columns import OUTCOME_FEATURES
from mergeit_hf.stage2.merge.results import OutcomeCounts
from mergeit_hf.stage2.prefilter import PrefilterResult
from mergeit_hf.stage2.scorer_check import ScorerCheck


@dataclass
class PipelineResult:
    """Everything a run produced, with the counts that explain it."""

    report: LoadReport
    stage1: Stage1Result
    merged_pairs: Dataset
    assembly: Assembly
    record: RunRecord
    card: DatasetCard
    requests_sent: int
    figures: dict[str, bytes] = dataclasses.field(default_factory=dict)  # the images the card shows, by repo path

    @property
    def final(self) -> Dataset:
        return self.assembly.final

    def save(self, folder: str | Path) -> list[Path]:
        """The CLI's output folder: data, card and figures, accounting, pairs, run record (``save``)."""
        return save(self, folder)

    def publish(self, repo_id: str, *, private: bool = False, api: Any = None) -> Any:
        """The same folder to a Hub dataset repo, data and card in one commit (``publish_curated``)."""
        return publish_curated(self, repo_id, private=private, api=api)

    def summary_table(self) -> str:
        record = self.record
        width = max(len(step) for step in [*record.counts, "rejected for quality and retention"])
        lines = [f"{step:<{width}}  {count:>8}" for step, count in record.counts.items()]
        lines += [f"{'rejected for ' + cause:<{width}}  {n:>8}" for cause, n in record.rejection_causes.items()]
        lines.append(f"{'acceptance rate':<{width}}  {record.acceptance_rate:>8.1%}")
        quartiles = retention_quartiles(self.merged_pairs)
        if quartiles:
            lines.append(f"{'weaker-side retention':<{width}}  " + " / ".join(f"{q:.2f}" for q in quartiles))
            lines.append(
                f"{'':<{width}}  (25th / 50th / 75th percentile; min_retention {record.config['min_retention']})"
            )
        if record.scorer_check:
            check = record.scorer_check
            verdict = "ok" if check["passed"] else f"BELOW {check['min_accuracy']}: the gate is noise"
            lines.append(f"{'scorer accuracy':<{width}}  {check['accuracy']:>8.2f}  (n={check['rows']}, {verdict})")
        lines.append(f"{'LLM requests sent':<{width}}  {self.requests_sent:>8}")
        if record.requests:
            requests = record.requests
            by_role = ", ".join(f"{role} {n}" for role, n in requests["by_role"].items())
            # (``unanswered`` is absent from records written before it was counted)
            unanswered = requests.get("unanswered", 0)
            kept = requests.get("kept_past_timeout", 0)
            lines.append(
                f"{'':<{width}}  ({by_role}; {requests['retried']} retried, {requests['throttled']} throttled, "
                f"{unanswered} unanswered"
                + (f", {kept} kept past request_timeout_s while generating" if kept else "")
                + ")"
            )
        tokens = record.tokens
        if tokens:
            lines.append(
                f"{'tokens (prompt / completion)':<{width}}  {tokens['prompt_tokens']} / {tokens['completion_tokens']}"
                f"  (over {tokens['pairs_counted']} pairs, cached replies included)"
            )
        if record.batch:
            batch = record.batch
            lines.append(
                f"{'batch API':<{width}}  {batch['rounds']} round(s), {batch['requests']} requests "
                f"({batch['answered']} answered, {batch['failed_lines']} failed lines, "
                f"{batch['unanswered']} unanswered, {batch.get('format_refused', 0)} refused their response_format; "
                f"lines written as {batch.get('structured_output', 'json_schema')}"
                + (f"; {batch['queue_refused']} batch(es) refused for the queue" if batch.get("queue_refused") else "")
                + ")"
            )
        for role, described in record.endpoints.items():
            lines.append(f"{role + ' endpoint':<{width}}  " + ", ".join(f"{k}: {v}" for k, v in described.items()))
        return "\n".join(lines)


def finish_run(
    source: str | Path | Dataset,
    report: LoadReport,
    stage1: Stage1Result,
    merged_pairs: Dataset,
    requests_sent: int,
    *,
    ledger: RequestLedger | None = None,
    prefiltered: PrefilterResult | None = None,
    scorer_check: ScorerCheck | None = None,
    endpoints: dict[str, dict[str, str]] | None = None,
    endpoint_given: bool = False,
    license: str | None = None,
    pretty_name: str | None = None,
    general_size: int | None = None,
    engine: str = "datasets",
    batch: dict[str, Any] | None = None,
) -> PipelineResult:
    """Assemble the final rows, the accounting, the run record and the card from both stages' results."""
    created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    left_out = prefiltered.dropped if prefiltered else []
    assembly = assemble(
        stage1.selected,
        stage1.rows,
        merged_pairs,
        report,
        version=__version__,
        created_at=created_at,
        prefiltered=left_out,
    )
    outcomes = OutcomeCounts.of_pairs(merged_pairs)
    record = RunRecord(
        source=str(source) if not isinstance(source, Dataset) else "<in-memory Dataset>",
        config=_recorded_config(stage1.config),
        merge_model=_model(merged_pairs, "merge_model"),
        quality_model=_model(merged_pairs, "quality_model"),
        embedding_source=stage1.embedding_source,
        created_at=created_at,
        version=__version__,
        counts=_counts(report, stage1, outcomes, assembly, len(left_out)),
        drop_reasons=report.drop_counts,
        unreadable=report.unreadable_detail if not report.complete else "",
        scores_incomplete=outcomes.scores_incomplete,
        rejection_causes=outcomes.rejection_causes,
        scorer_check=scorer_check.to_dict() if scorer_check else None,
        endpoints=endpoints or {},
        tokens=token_totals(merged_pairs),
        requests=ledger.to_dict() if ledger else {},
        endpoint_hint="URL" if endpoint_given else None,
        license=license,
        pretty_name=pretty_name,
        source_datasets=_hub_source(source),
        general_size=general_size,
        engine=engine,
        batch=batch or {},
    )
    card, figures = card_and_figures(record, assembly.final, pairs_for_export(merged_pairs))
    return PipelineResult(report, stage1, merged_pairs, assembly, record, card, requests_sent, figures)


def _model(merged_pairs: Dataset, column: str) -> str:
    present = len(merged_pairs) and column in merged_pairs.column_names
    models = [m for m in merged_pairs[column] if m] if present else []
    return models[0] if models else "none (no pair was merged)"


def _recorded_config(config: MergeItConfig) -> dict[str, Any]:
    """The config as the card and run.json publish it: a URL can name private infrastructure and a local
    path the user's folders, so endpoints say only that one was set, and model paths keep their file name."""
    values = config.to_dict()
    for name in ("scorer_endpoint", "judge_endpoint"):
        if values.get(name):
            values[name] = "URL"
    for name in ("local_model", "retention_model", "embedding_model"):
        if values.get(name):
            values[name] = model_label(str(values[name]))
    return values


def _counts(
    report: LoadReport, stage1: Stage1Result, outcomes: OutcomeCounts, assembly: Assembly, prefiltered: int
) -> dict[str, int]:
    conversations = stage1.conversation_counts()
    kept_whole = conversations.pop("multi-turn kept (not merged)", 0)
    return {
        "input records": report.records_read,
        "input rows": report.rows_extracted,
        "valid rows": report.rows_valid,
        **conversations,
        **({"left out by the prefilter": prefiltered} if prefiltered else {}),
        "selected": stage1.n_selected,
        "pairs": stage1.n_pairs,
        "paired rows": stage1.n_paired_rows,
        **outcomes.lines(),
        "unpaired selected rows": stage1.n_unpaired_selected,
        **({"multi-turn kept (not merged)": kept_whole} if kept_whole else {}),
        "final rows": len(assembly.final),
    }


def _hub_source(source: str | Path | Dataset) -> list[str]:
    if isinstance(source, str) and not Path(source).exists() and "/" in source:
        return [source]
    return []


def save(result: PipelineResult, folder: str | Path) -> list[Path]:
    """Write the repository layout (data, card, figures, accounting, pairs, run record) to ``folder``."""
    record = dataclasses.asdict(result.record)
    return write_repo_folder(folder, result.final, result.card, _extras(result), record, files=result.figures)


def publish_curated(result: PipelineResult, repo_id: str, *, private: bool = False, api: Any = None) -> Any:
    """Push the same layout as ``save`` to a Hub dataset repo, data, card and extras in one commit (unlike
    ``Dataset.push_to_hub``, whose card and data are separate commits); ``api``: an ``HfApi`` (or a double)."""
    return push_to_hub(
        result.final,
        repo_id,
        result.card,
        extras=_extras(result),
        files=result.figures,
        run_record=dataclasses.asdict(result.record),
        private=private,
        api=api,
    )


#: The name the pipeline and the CLI knew it by.
publish = publish_curated


def finish(
    stage1: Stage1Result | Dataset,
    merged_pairs: Dataset,
    *,
    config: MergeItConfig | None = None,
    report: LoadReport | None = None,
    source: str = "<in-memory Dataset>",
    license: str | None = None,
    pretty_name: str | None = None,
) -> PipelineResult:
    """What a script that ran the stages with ``Dataset.map`` holds, turned into the curated dataset: final rows
    (with ``messages``) and their provenance, the accounting of every row, the run record and the card.

    stage1: ``run_stage1``'s result, or every valid row with its ``selected`` column (``rows.map(plan)``).
    merged_pairs: the pairs after ``pairs.map(merger)`` (``merge_status`` and the merged fields).
    config: the config the stages ran with (stage 1's own when it is a ``Stage1Result``); report: what
    ``load_rows`` said of the input, so its drops are accounted for too (else the rows count as given).
    ``result.save(folder)`` writes the CLI's folder; ``result.publish(repo_id)`` the Hub repo, in one commit.
    """
    if not isinstance(stage1, Stage1Result):
        stage1 = _stage1_of(stage1, merged_pairs, config or MergeItConfig())
    if "merge_status" not in merged_pairs.column_names:
        raise InputError("merged_pairs has no merge_status column: map the pairs with a Merger first")
    merged_pairs = missing_as_none(merged_pairs)
    report = report or LoadReport(source, "given", len(stage1.rows), len(stage1.rows))
    return finish_run(source, report, stage1, merged_pairs, 0, license=license, pretty_name=pretty_name)


def missing_as_none(merged_pairs: Dataset) -> Dataset:
    """A ``map``'s merged pairs with NaN read as None: a batch whose pairs all failed writes NaN where a
    number is missing (``typed_for_map``), a later batch None; the curated dataset has None for both."""
    numbers = [
        name
        for name, feature in merged_pairs.features.items()
        if name in OUTCOME_FEATURES and getattr(feature, "dtype", "") in ("float64", "float32")
    ]
    if not numbers:
        return merged_pairs

    def as_none(batch: dict[str, list]) -> dict[str, list]:
        return {name: [None if v is not None and v != v else v for v in batch[name]] for name in numbers}

    with datasets_bars_off():
        return merged_pairs.map(as_none, batched=True, features=merged_pairs.features)


def _stage1_of(rows: Dataset, merged_pairs: Dataset, config: MergeItConfig) -> Stage1Result:
    """A stage 1 result from the rows a script holds (their ``selected`` column) and its pairs."""
    missing = [
        name for name in ("id", "instruction", "output", "selected", "cluster_id") if name not in rows.column_names
    ]
    if missing:
        raise InputError(f"the rows need the stage 1 columns {missing}; run embed, topics and selection on them first")
    if "source_index" not in rows.column_names:
        rows = rows.add_column("source_index", np.arange(len(rows), dtype=np.int64))
    selected = rows.select(np.flatnonzero(np.asarray(column_values(rows, "selected"), dtype=bool)))
    return Stage1Result(rows, selected, merged_pairs, None, None, config)


def _extras(result: PipelineResult) -> dict[str, Dataset]:
    return {"accounting": result.assembly.accounting, "pairs": pairs_for_export(result.merged_pairs)}


def token_totals(pairs: Dataset) -> dict[str, int]:
    """Prompt and completion tokens over the pairs (as their servers reported them), and pairs with a count."""
    if len(pairs) == 0 or "prompt_tokens" not in pairs.column_names:
        return {}
    counted = [(p, c) for p, c in zip(pairs["prompt_tokens"], pairs["completion_tokens"], strict=True) if p is not None]
    if not counted:
        return {}
    return {
        "prompt_tokens": sum(p for p, _ in counted),
        "completion_tokens": sum(c for _, c in counted),
        "pairs_counted": len(counted),
    }


def retention_quartiles(pairs: Dataset) -> list[float]:
    """25th, 50th and 75th percentile of the weaker source's retention over the scored merges."""

    if len(pairs) == 0 or "retention_a" not in pairs.column_names:
        return []
    weaker = [min(a, b) for a, b in zip(pairs["retention_a"], pairs["retention_b"], strict=True) if a is not None]
    return [float(q) for q in np.percentile(weaker, [25, 50, 75])] if weaker else []
