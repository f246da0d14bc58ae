"""Configuration validation, the Deita expected score and the quality gate."""

from __future__ import annotations

import math

import pytest

from mergeit_hf import ConfigError, MergeItConfig
from mergeit_hf.stage2.gate import gate_explanation, gate_threshold, passes_gate
from mergeit_hf.stage2.scoring.deita import expected_score


def test_paper_defaults_and_authors_preset():
    paper = MergeItConfig()
    assert (paper.n_clusters, paper.alpha, paper.embedding_model) == (
        120,
        0.75,
        "sentence-transformers/all-MiniLM-L6-v2",
    )
    authors = MergeItConfig.authors_scripts()
    assert (authors.per_cluster_budget, authors.tau, authors.alpha) == (75, 0.55, 0.5)
    assert (authors.pca_variance, authors.max_group_size, authors.temperature, authors.gate_retries) == (
        0.95,
        5,
        0.25,
        3,
    )
    assert round(authors.prefilter_top * 52_002) == 35_000
    assert authors.resolve_n_clusters(52_002) == round(math.sqrt(52_002 / 2))
    assert paper.resolve_n_clusters(50) == 50  # never more clusters than rows


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("tau", 1.5, "tau"),
        ("selection_budget", 1.5, "fraction"),
        ("selection_budget", 0, "count"),
        ("n_clusters", 0, "n_clusters"),
        ("alpha", 0, "alpha"),
        ("concurrency", 0, "concurrency"),
        ("max_group_size", 6, r"max_group_size must lie in \[2, 5\], got 6"),
        ("prefilter_top", 1.5, "prefilter_top as a fraction"),
        ("prefilter_top", 0, "prefilter_top as a count"),
        ("pca_variance", 1.0, "pca_variance is a share"),
        ("scorer_endpoint", "localhost:80", "scorer_endpoint must be an http"),
    ],
)
def test_bad_values_are_named(field, value, message):
    with pytest.raises(ConfigError, match=message):
        MergeItConfig(**{field: value})


def test_config_file_round_trip_and_unknown_keys(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("tau: 0.7\npreset: authors_scripts\n")
    config = MergeItConfig.from_file(path)
    assert (config.tau, config.per_cluster_budget) == (0.7, 75)
    path.write_text("taus: 0.7\n")
    with pytest.raises(ConfigError, match=r"unknown parameter\(s\) \['taus'\]"):
        MergeItConfig.from_file(path)


def test_expected_score_is_softmax_expectation_over_digits():
    tops = [
        ("4", math.log(0.5)),
        ("5", math.log(0.3)),
        ("Sure", math.log(0.1)),
        ("1", math.log(0.05)),
        ("2", math.log(0.02)),
        ("3", math.log(0.02)),
        (" 6", math.log(0.01)),
    ]
    score = expected_score(tops)
    digits = {1: 0.05, 2: 0.02, 3: 0.02, 4: 0.5, 5: 0.3, 6: 0.01}
    assert score.complete and score.value == pytest.approx(sum(k * v for k, v in digits.items()) / sum(digits.values()))


def test_missing_digits_are_counted_never_defaulted_to_three():
    partial = expected_score([("5", -0.1), ("Hello", -1.0)])
    assert partial.value == pytest.approx(5.0) and partial.digits_found == 1 and not partial.complete
    none = expected_score([("Hello", -0.1)])
    assert none.value is None and not none.available


def test_gate_is_strict_inequality():
    assert passes_gate(4.6, (3.0, 3.0), 0.75)
    assert not passes_gate(4.5, (3.0, 3.0), 0.75)
    assert "4.500 <= 0.75·(3.000+3.000)=4.500" in gate_explanation(4.5, (3.0, 3.0), 0.75)
    # A group of k: α·(2/k)·Σ q — the same bar on the sources' mean as a pair's, Eq. 9 at k = 2.
    assert gate_threshold((3.0, 3.0, 3.0, 3.0), 0.75) == pytest.approx(4.5)
    assert not passes_gate(4.5, (2.0, 3.0, 4.0), 0.75) and passes_gate(4.51, (2.0, 3.0, 4.0), 0.75)
    assert "0.75·(2/3)·(2.000+3.000+4.000)=4.500" in gate_explanation(4.5, (2.0, 3.0, 4.0), 0.75)
