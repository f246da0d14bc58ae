"""Merge quality on real data: acceptance, retention, scorer-check accuracy, per embedded model, in one run.

On the shared GPTeacher roleplay set (paper defaults for stage 1), the first N pairs are merged, scored
and gated in-process by each model given (``local_model``: the bundled SmolLM2-135M, and a ~1.5B
instruct GGUF such as the Qwen2.5-Coder-1.5B-Instruct that ../shared/tools/qwen-coder-1.5b.sh rebuilds).
Printed per model: the scorer check's accuracy, acceptance at α = 0.75 and 0.5 with the quality gate
alone and with the retention gate at several thresholds (from the stored scores, as ``mergeit sweep``),
the weaker-side retention distribution, and every merge beside its sources in a markdown file for
reading by eye. Requests are cached under ~/.cache/mergeit-bench/requests, so a second run is free.
Run: cd bench && ../.venv/bin/python quality.py --model smollm2 --model /path/to/qwen.gguf [--pairs 24]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from _common import shared_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mergeit_hf as m
from mergeit_hf.endpoints.sending.sync import run_sync
from mergeit_hf.output import sweep
from mergeit_hf.stage2.merge.columns import outcome_columns
from mergeit_hf.stage2.merge.merger import Merger
from mergeit_hf.stage2.scorer_check import run_scorer_check

RETENTIONS = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7)
ALPHAS = (0.75, 0.5)
CACHE = Path.home() / ".cache" / "mergeit-bench" / "requests"


def measure(model: str | None, pairs, rows, args) -> dict:
    # Missing digits are counted, not fatal: the bench measures what each model does.
    config = m.MergeItConfig(
        local_model=model, max_new_tokens=512, scorer_check_rows=args.check_rows, max_missing_score_fraction=1.0
    )
    merger = Merger(config=config, cache_dir=str(CACHE))
    started = time.perf_counter()
    check = run_scorer_check(rows, merger, args.check_rows)
    print(check.report(), flush=True)
    batch = run_sync(merger.merge_pairs(pairs.to_list(), merger.templates()))
    model_id, counts = batch.merge_model, batch.counts
    merged = pairs
    columns = outcome_columns(batch.outcomes, config, merger.templates(), batch.merge_model, batch.quality_model)
    for name, values in columns.items():
        merged = merged.add_column(name, values)
    scored = sweep.scored_pairs(merged)
    table = sweep.sweep(scored, ALPHAS, RETENTIONS)
    weaker = [min(a, b) for a, b in zip(merged["retention_a"], merged["retention_b"], strict=True) if a is not None]
    return {
        "model": model_id,
        "seconds": time.perf_counter() - started,
        "check": check,
        "table": table,
        "failed": counts.of("failed"),
        "weaker": weaker,
        "pairs": merged,
    }


def report(results: list[dict], n_pairs: int) -> str:
    lines = [f"## Merge quality on {n_pairs} gpteacher_roleplay pairs (paper stage 1, τ = 0.60)\n"]
    head = "| model | scorer accuracy | failed | α | " + " | ".join(f"R={r:.1f}" for r in RETENTIONS) + " |"
    lines += [head, "|---" * (4 + len(RETENTIONS)) + "|"]
    for result in results:
        table = result["table"]
        for alpha in ALPHAS:
            cells = [f"{table.accepted[(alpha, r)]}/{table.n_scored}" for r in RETENTIONS]
            check = result["check"]
            lines.append(
                f"| {result['model']} | {check.accuracy:.2f} (n={check.n_rows}) | {result['failed']} | {alpha} | "
                + " | ".join(cells)
                + " |"
            )
    lines.append("\nR = min_retention (0.0: the quality gate alone); cells: accepted / scored pairs.\n")
    lines += ["| model | weaker-side retention p10 / p25 / p50 / p75 / p90 | seconds |", "|---|---|---|"]
    for result in results:
        q = np.percentile(result["weaker"], [10, 25, 50, 75, 90]) if result["weaker"] else []
        lines.append(f"| {result['model']} | {' / '.join(f'{v:.2f}' for v in q)} | {result['seconds']:.0f} |")
    return "\n".join(lines)


def merges_by_eye(result: dict) -> str:
    out = [f"# Merges by {result['model']}\n"]
    for row in result["pairs"]:
        out.append(f"## {row['pair_id']} — {row['merge_status']} ({row['rejection_cause'] or row['merge_status']})")
        out.append(f"reason: {row['merge_reason']}\n")
        for side in ("a", "b"):
            question, answer = row[f"retention_{side}_question"], row[f"retention_{side}_answer"]
            parts = "not measured" if question is None else f"question {question:.2f}, answer {answer:.2f}"
            out.append(f"**{side}** (retention {parts}): {row[f'{side}_instruction']}")
            out.append(f"> {row[f'{side}_output'][:600]}\n")
        out.append(f"**merged** instruction: {row['merged_instruction']}\ninput: {row['merged_input']}")
        out.append(f"> {row['merged_output'][:1200]}\n")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", action="append", default=[], help="'smollm2' or a GGUF path (repeatable)")
    parser.add_argument("--pairs", type=int, default=24)
    parser.add_argument("--check-rows", type=int, default=32)
    parser.add_argument("--out", default="quality.out.md", help="markdown file for the table")
    args = parser.parse_args()
    rows, _ = m.load_rows(shared_file("gpteacher_roleplay.json"))
    stage1 = m.run_stage1(rows, m.MergeItConfig())
    pairs = stage1.pairs.select(range(min(args.pairs, stage1.n_pairs)))
    sample = stage1.selected.select_columns(["instruction", "input", "output"]).to_list()
    results = []
    for model in args.model or ["smollm2"]:
        result = measure(None if model == "smollm2" else model, pairs, sample, args)
        results.append(result)
        name = Path(result["model"]).stem
        Path(f"quality.merges.{name}.md").write_text(merges_by_eye(result))
        summary = {"model": result["model"], "check": result["check"].to_dict(), "weaker": result["weaker"]}
        Path(f"quality.{name}.json").write_text(json.dumps(summary, indent=1))
    text = report(results, len(pairs))
    print(text)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
