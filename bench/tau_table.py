"""Pairs found against τ on the shared data, under the paper's stage 1 defaults.

The paper gives no τ; this table is the measurement behind ``DEFAULT_TAU``.
Run: .venv/bin/python bench/tau_table.py
"""

from __future__ import annotations

import sys

from _common import shared_file

import mergeit_hf as m
from mergeit_hf.stage1.pairs import pairs_against_tau

TAUS = [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]
FILES = ["alpaca_seed_tasks.jsonl", "gpteacher_roleplay.json", "gpteacher_toolformer.json"]


def main() -> None:
    config = m.MergeItConfig()
    print(f"stage 1 with paper defaults: m={config.n_clusters}, budget={config.selection_budget}")
    header = "| τ | " + " | ".join(f"{name} pairs (rows paired)" for name in FILES) + " |"
    columns = []
    for name in FILES:
        rows, _ = m.load_rows(shared_file(name))
        result = m.run_stage1(rows, config)
        print(f"{name}: {result.n_rows} rows, {result.n_selected} selected", file=sys.stderr)
        columns.append((result.n_selected, pairs_against_tau(result.selected, TAUS)))
    print(header)
    print("|---" * (len(FILES) + 1) + "|")
    for index, tau in enumerate(TAUS):
        cells = [f"{table[index][1]} ({table[index][2] / selected:.0%})" for selected, table in columns]
        print(f"| {tau:.2f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
