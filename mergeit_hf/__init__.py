"""mergeit-hf: MergeIT (Cai et al., arXiv 2503.00034) as Hugging Face ``datasets`` stages.

In a script: ``load_rows`` → ``Embedder.from_config(config)`` → ``fit_topics`` → ``plan_selection`` →
``find_pairs`` → ``Merger(config=config)`` (each a ``Dataset.map`` function or a step over a ``Dataset``) →
``finish`` (the curated dataset, its accounting and card) → ``.save(folder)`` / ``.publish(repo_id)``.
``run_pipeline`` (and ``mergeit run``) does all of it. ``embed_batch`` and ``merge_batch`` are the default
config's embedder and merger (the merger reads ``MERGEIT_ENDPOINT`` and the other ``MERGEIT_*`` variables).
"""

import warnings
from typing import Any

from mergeit_hf._version import __version__
from mergeit_hf.config import DEFAULT_EMBEDDING_MODEL, MergeItConfig
from mergeit_hf.embeddings.embedder import Embedder, embed_batch
from mergeit_hf.engines.datasets_engine import run_stage1
from mergeit_hf.errors import (
    ConfigError,
    EndpointError,
    InputError,
    MergeItError,
    QualityScoringError,
    TemplateError,
)
from mergeit_hf.inputs.loading import LoadReport, load_rows
from mergeit_hf.output.publish import write_repo_folder
from mergeit_hf.run.finish import PipelineResult, finish, publish_curated
from mergeit_hf.run.pipeline import run_pipeline
from mergeit_hf.stage1.pairs import find_pairs
from mergeit_hf.stage1.result import Stage1Result
from mergeit_hf.stage1.selection import SelectionPlan, add_selection, plan_selection
from mergeit_hf.stage1.topics import TopicClusters, add_topics, fit_topics
from mergeit_hf.stage2.merge.merger import Merger, merge_batch

__all__ = [
    "DEFAULT_EMBEDDING_MODEL",
    "ConfigError",
    "Embedder",
    "EndpointError",
    "InputError",
    "LoadReport",
    "MergeItConfig",
    "MergeItError",
    "Merger",
    "PipelineResult",
    "QualityScoringError",
    "SelectionPlan",
    "Stage1Result",
    "TemplateError",
    "TopicClusters",
    "__version__",
    "add_selection",
    "add_topics",
    "embed_batch",
    "find_pairs",
    "finish",
    "fit_topics",
    "load_rows",
    "merge_batch",
    "plan_selection",
    "publish_curated",
    "run_pipeline",
    "run_stage1",
    "write_repo_folder",
]

#: Names of the previous release, kept for one release: (where the thing now is, what to use instead).
_DEPRECATED = {
    "fit_topic_clusters": ("mergeit_hf.stage1.topics", "fit_topics", "fit_topics"),
    "add_clusters": ("mergeit_hf.stage1.topics", "add_topics", "add_topics"),
    "is_selected": ("mergeit_hf.stage1.selection", "is_selected", 'rows.filter(lambda s: s, input_columns="selected")'),
    "pairs_against_tau": ("mergeit_hf.stage1.pairs", "pairs_against_tau", "mergeit_hf.stage1.pairs.pairs_against_tau"),
    "MergeStats": ("mergeit_hf.stage2.merge.results", "MergeStats", "the merged pairs' columns"),
    "push_to_hub": ("mergeit_hf.output.publish", "push_to_hub", "finish(...).publish(repo_id) or publish_curated"),
}


def __getattr__(name: str) -> Any:
    if name not in _DEPRECATED:
        raise AttributeError(f"module 'mergeit_hf' has no attribute {name!r}")
    module, attribute, instead = _DEPRECATED[name]
    warnings.warn(f"mergeit_hf.{name} is deprecated and goes in the next release: use {instead}", FutureWarning, 2)
    import importlib

    return getattr(importlib.import_module(module), attribute)
