"""mergeit-hf: MergeIT (Cai et al., arXiv 2503.00034) as Hugging Face ``datasets`` stages."""

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
from mergeit_hf.output.publish import push_to_hub, write_repo_folder
from mergeit_hf.run.pipeline import PipelineResult, run_pipeline
from mergeit_hf.stage1.pairs import find_pairs, pairs_against_tau
from mergeit_hf.stage1.result import Stage1Result
from mergeit_hf.stage1.selection import SelectionPlan, add_selection, is_selected, plan_selection
from mergeit_hf.stage1.topics import TopicClusters, add_clusters, fit_topic_clusters
from mergeit_hf.stage2.merge.merger import Merger, MergeStats, merge_batch

__all__ = [
    "DEFAULT_EMBEDDING_MODEL",
    "ConfigError",
    "Embedder",
    "EndpointError",
    "InputError",
    "LoadReport",
    "MergeItConfig",
    "MergeItError",
    "MergeStats",
    "Merger",
    "PipelineResult",
    "QualityScoringError",
    "SelectionPlan",
    "Stage1Result",
    "TemplateError",
    "TopicClusters",
    "__version__",
    "add_clusters",
    "add_selection",
    "embed_batch",
    "find_pairs",
    "fit_topic_clusters",
    "is_selected",
    "load_rows",
    "merge_batch",
    "pairs_against_tau",
    "plan_selection",
    "push_to_hub",
    "run_pipeline",
    "run_stage1",
    "write_repo_folder",
]
