"""Merge the labelled set's source pairs (pairs.yaml) with a real model, for labelling by reading.

Each pair goes through stage 2 as ``mergeit run`` sends it (default config, α 0.5 as the README recommends
for a chat-model scorer, the judge on), in-process with the GGUF given. Written to
real.unlabelled.jsonl: the sources, the merge, and what the gate saw (retention parts, judge, decision).
A reader then copies each line to real.jsonl with ``class``, ``expected`` and a ``note``; build.py adds
real.jsonl to cases.jsonl. Requests are cached under ~/.cache/mergeit-bench/requests.
Run: ../../.venv/bin/python real_merges.py /path/to/model.gguf
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import mergeit_hf as m
from mergeit_hf.endpoints.sending.sync import run_sync
from mergeit_hf.stage2.merge.columns import outcome_columns
from mergeit_hf.stage2.merge.merger import Merger

HERE = Path(__file__).resolve().parent
CACHE = Path.home() / ".cache" / "mergeit-bench" / "requests"
FIELDS = ("instruction", "input", "output")


def pair_rows(pairs: list[dict]) -> list[dict]:
    rows = []
    for pair in pairs:
        row = {"pair_id": pair["id"], "cluster_id": 0, "similarity": 0.8, "group_size": 2, "more_sources": []}
        for side in ("a", "b"):
            row[f"{side}_id"] = f"{pair['id']}:{side}"
            row |= {f"{side}_{name}": pair[side].get(name, "") for name in FIELDS}
        rows.append(row)
    return rows


def main() -> None:
    model = sys.argv[1]
    pairs = yaml.safe_load((HERE / "pairs.yaml").read_text())
    config = m.MergeItConfig(local_model=model, alpha=0.5, judge=True, max_missing_score_fraction=1.0)
    merger = Merger(config=config, cache_dir=str(CACHE), show_progress=True)
    templates = merger.templates()
    batch = run_sync(merger.merge_pairs(pair_rows(pairs), templates))
    columns = outcome_columns(batch.outcomes, config, templates, batch.merge_model, batch.quality_model)
    out = []
    for i, pair in enumerate(pairs):
        row = {name: values[i] for name, values in columns.items()}
        out.append(
            {
                "id": f"{pair['id']}/{Path(model).stem}",
                "origin": Path(model).name,
                "sources": [{name: pair[side].get(name, "") for name in FIELDS} for side in ("a", "b")],
                "merged": {name: row[f"merged_{name}"] for name in FIELDS},
                "gate": {
                    name: row[name]
                    for name in (
                        "merge_status",
                        "merge_reason",
                        "retention_a_question",
                        "retention_a_answer",
                        "retention_b_question",
                        "retention_b_answer",
                        "judge_p_yes",
                    )
                },
            }
        )
    (HERE / "real.unlabelled.jsonl").write_text("".join(json.dumps(o, ensure_ascii=False) + "\n" for o in out))
    print(
        f"wrote {len(out)} merges by {batch.merge_model}: {batch.counts.of('accepted')} accepted, "
        f"{batch.counts.of('rejected')} rejected, {batch.counts.of('failed')} failed"
    )


if __name__ == "__main__":
    main()
