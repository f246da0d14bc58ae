"""A run's output folder: written from its parts (data, card and figures, accounting, pairs, run record),
and read back for ``mergeit regate`` and ``mergeit card``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset
from huggingface_hub import DatasetCard

from mergeit_hf.errors import InputError
from mergeit_hf.output import figures, sweep
from mergeit_hf.output.card import RunRecord, build_card
from mergeit_hf.output.publish import EXTRAS_FOLDER, write_repo_folder
from mergeit_hf.progress import datasets_bars_off

#: What ``pairs.parquet`` must hold for the gate to be applied again.
REQUIRED_COLUMNS = ("merge_status", "quality_a", "quality_b", "attempt_log")


def write_output(
    folder: str | Path, final: Dataset, pairs: Dataset, accounting: Dataset, record: RunRecord
) -> list[Path]:
    """A run folder written again from its parts (``mergeit regate``, ``mergeit card``): card and figures are
    rebuilt from the record, the layout is ``save``'s."""
    pairs = pairs_for_export(pairs)
    card, figures = card_and_figures(record, final, pairs)
    extras = {"accounting": accounting, "pairs": pairs}
    return write_repo_folder(folder, final, card, extras, dataclasses.asdict(record), files=figures)


def card_and_figures(record: RunRecord, final: Dataset, pairs: Dataset) -> tuple[DatasetCard, dict[str, bytes]]:
    """The card and the images it shows (``mergeit/retention.png``, ``mergeit/sweep.png``) when pairs were scored."""
    figures = run_figures(record, pairs)
    return build_card(record, final, pairs, figures=sorted(figures)), figures


def run_min_judge(record: RunRecord) -> float | None:
    config = record.config
    return float(config.get("min_judge", 0.5)) if config.get("judge") else None


def run_figures(record: RunRecord, pairs: Dataset) -> dict[str, bytes]:
    if len(pairs) == 0 or "attempt_log" not in pairs.column_names:
        return {}
    with datasets_bars_off():
        scored = pairs.filter(lambda status: status in sweep.SCORED, input_columns="merge_status")
    if len(scored) == 0:
        return {}
    alpha, min_retention = float(record.config["alpha"]), float(record.config["min_retention"])
    table = sweep.sweep(sweep.scored_pairs(scored), current=(alpha, min_retention), min_judge=run_min_judge(record))
    folder = EXTRAS_FOLDER
    images = {f"{folder}/{figures.SWEEP_FIGURE}": figures.sweep_figure(table)}
    if any(value is not None for value in scored["retention_a"]):  # none with compute_retention off
        images[f"{folder}/{figures.RETENTION_FIGURE}"] = figures.retention_figure(
            scored["retention_a"], scored["retention_b"], scored["merge_status"], min_retention
        )
    return images


def pairs_for_export(pairs: Dataset) -> Dataset:
    return pairs.remove_columns([c for c in ("embedding",) if c in pairs.column_names])


def render_card_again(folder: str | Path) -> DatasetCard:
    """``mergeit card DIR``: rebuild README.md (and its figures) from the saved run record, data and pairs."""
    out = OutputFolder.open(folder)
    write_output(out.folder, out.final, out.pairs, out.accounting, out.record)
    return DatasetCard((out.folder / "README.md").read_text(encoding="utf-8"))


def read_parquet(paths: list[Path]) -> Dataset:
    # pyarrow, not Dataset.from_parquet: the latter refuses a file with zero rows (a run without pairs).
    import pyarrow as pa
    import pyarrow.parquet as pq

    return Dataset(pa.concat_tables([pq.read_table(path) for path in paths]))


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

    @property
    def min_judge(self) -> float | None:
        """The judge's threshold when the run asked the judge, else None."""
        return run_min_judge(self.record)
