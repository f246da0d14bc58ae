"""Stage 2 columns of a batch of pairs: the kept merge, scores, retention, decision and provenance."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from datasets import Dataset, Features, List, Value

from mergeit_hf._version import __version__
from mergeit_hf.config import MergeItConfig
from mergeit_hf.prompts import PromptTemplate
from mergeit_hf.stage2.merge.request import merge_params
from mergeit_hf.stage2.merge.results import MergeOutcome

_TEXT = Value("string")
_FLOAT = Value("float64")
_INT = Value("int64")
#: The type of every outcome column, whatever a batch holds: a batch whose pairs all failed has None scores,
#: from which ``datasets`` would infer a null column that a later batch's floats cannot be written into.
OUTCOME_FEATURES = Features(
    {
        **{name: _TEXT for name in ("merged_instruction", "merged_input", "merged_output")},
        **{name: _TEXT for name in ("merge_status", "merge_reason", "rejection_cause")},
        **{name: _FLOAT for name in ("quality_merged", "quality_a", "quality_b", "retention_a", "retention_b")},
        **{f"retention_{side}_{part}": _FLOAT for side in "ab" for part in ("question", "answer")},
        "judge_p_yes": _FLOAT,
        **{name: List(_FLOAT) for name in ("quality_more", "retention_more")},
        **{name: List(_FLOAT) for name in ("retention_more_question", "retention_more_answer")},
        **{name: _INT for name in ("quality_scores_incomplete", "merge_attempts", "prompt_tokens")},
        **{name: _INT for name in ("completion_tokens", "gate_attempts")},
        "attempt_log": _TEXT,
        **{name: _FLOAT for name in ("alpha", "min_retention", "min_judge")},
        **{name: _TEXT for name in ("merge_model", "quality_model", "merge_template", "merge_template_sha256")},
        **{name: _TEXT for name in ("quality_template_sha256", "generation_params", "merged_at", "mergeit_version")},
    }
)
COMPLEXITY_FEATURES = Features(
    {"complexity_merged": _FLOAT, "complexity_a": _FLOAT, "complexity_b": _FLOAT, "complexity_more": List(_FLOAT)}
)


def outcome_features(config: MergeItConfig) -> Features:
    """The outcome columns' types for a run with ``config`` (complexity columns with ``complexity_scores``)."""
    return Features({**OUTCOME_FEATURES, **(COMPLEXITY_FEATURES if config.complexity_scores else {})})


def outcome_dataset(columns: dict[str, list], config: MergeItConfig) -> Dataset:
    """The outcome columns as a dataset, typed by ``outcome_features`` (never a null column)."""
    return Dataset.from_dict(columns, features=outcome_features(config))


def typed_for_map(columns: dict[str, list], config: MergeItConfig) -> dict[str, Any]:
    """A ``map`` batch's outcome columns in forms ``datasets`` types right even when every pair of the batch
    failed. ``map`` fixes a column's type at its first batch and takes no types from the function, so a
    column of None only (a number nobody could compute) goes out as float64 NaN and a list column of empty
    lists as float arrays; columns with a value keep None for what is missing."""
    features = outcome_features(config)
    typed: dict[str, Any] = dict(columns)
    for name, values in columns.items():
        if not _can_hold_a_value(name, config):
            continue  # None in every batch of this run (no judge asked, no retention measured): null throughout
        feature = features[name]
        if isinstance(feature, Value) and feature.dtype in ("float64", "int64") and all(v is None for v in values):
            typed[name] = np.full(len(values), np.nan)
        elif isinstance(feature, List) and not any(values):
            typed[name] = _float_arrays(values)
    return typed


def _can_hold_a_value(name: str, config: MergeItConfig) -> bool:
    if name in ("judge_p_yes", "min_judge"):
        return config.judge
    if name.startswith("retention_"):
        return config.compute_retention
    return True


def _float_arrays(values: list) -> np.ndarray:
    arrays = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        arrays[i] = np.asarray(value or [], dtype=np.float64)
    return arrays


def outcome_columns(
    outcomes: list[MergeOutcome],
    config: MergeItConfig,
    templates: tuple[PromptTemplate, ...],
    merge_model: str = "",
    quality_model: str = "",
) -> dict[str, list]:
    """Stage 2 columns for a batch of pairs, provenance included.

    Pairs fill ``quality_a/b`` and ``retention_a/b``; a group's further sources go to ``quality_more`` and
    ``retention_more`` in the order of ``more_sources``. ``attempt_log`` is JSON (a list with one object
    per gate attempt: seed, merged fields, quality, retentions, lost items, error): one string type whatever
    the batch holds, so ``datasets`` never meets a batch whose nested type it cannot infer, and
    ``mergeit regate`` reads every attempt back.
    """
    merge_template, quality_template = templates
    generation = json.dumps(merge_params(config, 0), sort_keys=True)
    n = len(outcomes)
    retention = lambda o, i: o.retentions[i] if o.retentions else None  # noqa: E731
    part = lambda o, i, j: o.retention_parts[i][j] if len(o.retention_parts) > i else None  # noqa: E731
    quality = lambda o, i: o.source_qualities[i] if len(o.source_qualities) > i else None  # noqa: E731
    columns = {
        "merged_instruction": [(o.merged or {}).get("instruction", "") for o in outcomes],
        "merged_input": [(o.merged or {}).get("input", "") for o in outcomes],
        "merged_output": [(o.merged or {}).get("output", "") for o in outcomes],
        "merge_status": [o.status for o in outcomes],
        "merge_reason": [o.reason for o in outcomes],
        "rejection_cause": [o.rejection_cause or "" for o in outcomes],
        "quality_merged": [o.quality_merged for o in outcomes],
        "quality_a": [quality(o, 0) for o in outcomes],
        "quality_b": [quality(o, 1) for o in outcomes],
        "retention_a": [retention(o, 0) for o in outcomes],
        "retention_b": [retention(o, 1) for o in outcomes],
        # Each source's question (in the merged instruction and input) and answer (in the merged output).
        "retention_a_question": [part(o, 0, 0) for o in outcomes],
        "retention_a_answer": [part(o, 0, 1) for o in outcomes],
        "retention_b_question": [part(o, 1, 0) for o in outcomes],
        "retention_b_answer": [part(o, 1, 1) for o in outcomes],
        "judge_p_yes": [o.judge for o in outcomes],
        # Sources 3..k of a group (``more_sources``), in order; empty for pairs.
        "quality_more": [list(o.source_qualities[2:]) for o in outcomes],
        "retention_more": [list((o.retentions or ())[2:]) for o in outcomes],
        "retention_more_question": [[q for q, _ in o.retention_parts[2:]] for o in outcomes],
        "retention_more_answer": [[a for _, a in o.retention_parts[2:]] for o in outcomes],
        "quality_scores_incomplete": [o.scores_incomplete for o in outcomes],
        "merge_attempts": [o.attempts for o in outcomes],
        # Tokens of every reply the pair used (merges and scores, cached ones too), as the servers reported them.
        "prompt_tokens": [o.tokens[0] if o.tokens else None for o in outcomes],
        "completion_tokens": [o.tokens[1] if o.tokens else None for o in outcomes],
        "gate_attempts": [len(o.gate_attempts) for o in outcomes],
        "attempt_log": [json.dumps([a.to_dict() for a in o.gate_attempts], ensure_ascii=False) for o in outcomes],
        "alpha": [config.alpha] * n,
        "min_retention": [config.min_retention] * n,
        "min_judge": [config.min_judge if config.judge else None] * n,
        "merge_model": [merge_model] * n,
        "quality_model": [quality_model] * n,
        "merge_template": [merge_template.name] * n,
        "merge_template_sha256": [merge_template.sha256] * n,
        "quality_template_sha256": [quality_template.sha256] * n,
        "generation_params": [generation] * n,
        "merged_at": [o.completed_at for o in outcomes],
        "mergeit_version": [__version__] * n,
    }
    if config.complexity_scores:
        complexity = lambda o, i: o.source_complexities[i] if len(o.source_complexities) > i else None  # noqa: E731
        columns |= {
            "complexity_merged": [o.complexity_merged for o in outcomes],
            "complexity_a": [complexity(o, 0) for o in outcomes],
            "complexity_b": [complexity(o, 1) for o in outcomes],
            "complexity_more": [list(o.source_complexities[2:]) for o in outcomes],
        }
    return columns
