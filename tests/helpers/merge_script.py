"""Merge the pairs of a parquet file through an endpoint; used by the SIGKILL-and-resume test."""

import json
import sys

from datasets import Dataset

from mergeit_hf import MergeItConfig
from mergeit_hf.stage2.merge.merger import Merger

pairs_path, endpoint, cache_dir, output_path = sys.argv[1:5]
config = MergeItConfig(max_new_tokens=160, top_logprobs=1000, max_missing_score_fraction=1.0, concurrency=2)
pairs = Dataset.from_parquet(pairs_path)
merged = pairs.map(Merger(endpoint=endpoint, config=config, cache_dir=cache_dir), batched=True, batch_size=64)
keep = [
    "pair_id",
    "merge_status",
    "merge_reason",
    "merged_instruction",
    "merged_output",
    "quality_merged",
    "quality_a",
    "quality_b",
    "merged_at",
]
with open(output_path, "w") as out:
    json.dump(merged.select_columns(keep).to_list(), out)
