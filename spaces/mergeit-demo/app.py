"""MergeIT demo Space: pick data, watch topics form, merge pairs live, download the result and its card.

The LLM endpoint comes only from the Space's secrets (MERGEIT_ENDPOINT, HF_TOKEN); without them the
embedded llama.cpp model runs in-process. Visitors cannot point the Space at another URL.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd

from mergeit_hf import MergeItConfig, MergeItError, load_rows, run_stage1
from mergeit_hf.output.regate import regate_pairs
from mergeit_hf.resources import resource_dir
from mergeit_hf.run.pipeline import finish_run, save
from mergeit_hf.stage2.merge.merged_pairs import merged_pairs_dataset, with_skipped
from mergeit_hf.stage2.merge.merger import Merger

MAX_ROWS = int(os.environ.get("MERGEIT_SPACE_MAX_ROWS", "2000"))
MAX_PAIRS = int(os.environ.get("MERGEIT_SPACE_MAX_PAIRS", "12"))
MAX_UPLOAD = "20mb"
EXAMPLE = "Example data (42 hand-written Alpaca rows)"
SOURCES = [EXAMPLE, "Upload a file", "Hub dataset"]
PAIR_COLUMNS = ["cluster", "similarity", "instruction a", "instruction b"]
MERGE_COLUMNS = [
    "decision",
    "q(a)",
    "q(b)",
    "q(merged)",
    "retention a: question / answer",
    "retention b: question / answer",
    "judge P(yes)",
    "source a",
    "source b",
    "merged",
    "why",
]


def example_path() -> Path:
    return resource_dir("examples") / "mini_alpaca.jsonl"


def shown_in_page(handler: Callable) -> Callable:
    """Every error reaches the visitor as a message in the page, never as a stack trace."""

    @functools.wraps(handler)
    def wrapper(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except gr.Error:
            raise
        except MergeItError as exc:
            raise gr.Error(str(exc)) from None
        except Exception as exc:
            raise gr.Error(f"{type(exc).__name__}: {exc}") from None

    return wrapper


def _source(choice: str, upload: str | None, hub_name: str) -> str:
    if choice == EXAMPLE:
        return str(example_path())
    if choice == "Upload a file":
        if not upload:
            raise gr.Error("Upload a JSON, JSON lines or parquet file first.")
        return upload
    if not hub_name.strip():
        raise gr.Error("Type a Hub dataset name, e.g. tatsu-lab/alpaca.")
    return hub_name.strip()


@shown_in_page
def run_topics(choice: str, upload: str | None, hub_name: str, clusters: float, budget: float, tau: float, state: dict):
    """Stage 1: load, embed, cluster, select and pair; returns the map, counts and pairs."""
    source = _source(choice, upload, hub_name)
    rows, report = load_rows(source)
    if len(rows) > MAX_ROWS:
        raise gr.Error(f"This demo takes at most {MAX_ROWS} rows; the input has {len(rows)}. Use the CLI for more.")
    config = MergeItConfig(n_clusters=int(clusters), selection_budget=float(budget), tau=float(tau))
    stage1 = run_stage1(rows, config)
    state = {"source": source, "report": report, "stage1": stage1, "merged": None}
    return _topic_map(stage1), _counts_markdown(report, stage1), _pairs_table(stage1), state


def _topic_map(stage1) -> pd.DataFrame:
    from sklearn.decomposition import PCA

    vectors = np.asarray(stage1.rows.with_format("numpy")["embedding"])
    points = (
        PCA(n_components=2, random_state=0).fit_transform(vectors) if len(vectors) > 2 else np.zeros((len(vectors), 2))
    )
    return pd.DataFrame(
        {
            "x": points[:, 0],
            "y": points[:, 1],
            "topic": [f"topic {c}" for c in stage1.rows["cluster_id"]],
            "selected": ["selected" if s else "not selected" for s in stage1.rows["selected"]],
            "instruction": [text[:80] for text in stage1.rows["instruction"]],
        }
    )


def _counts_markdown(report, stage1) -> str:
    drops = ", ".join(f"{n} {reason}" for reason, n in report.drop_counts.items()) or "none"
    unread = "" if report.complete else f"\n\n**Not read:** {report.unreadable_detail}"
    return (
        f"**{report.rows_extracted}** rows read, **{report.rows_valid}** valid (dropped: {drops}) → "
        f"**{stage1.topics.n_clusters}** topics → **{stage1.n_selected}** selected → **{stage1.n_pairs}** pairs "
        f"at τ = {stage1.config.tau}{unread}"
    )


def _pairs_table(stage1) -> pd.DataFrame:
    pairs = stage1.pairs
    return pd.DataFrame(
        {
            "cluster": list(pairs["cluster_id"]),
            "similarity": [round(s, 3) for s in pairs["similarity"]],
            "instruction a": list(pairs["a_instruction"]),
            "instruction b": list(pairs["b_instruction"]),
        },
        columns=PAIR_COLUMNS,
    )


@shown_in_page
def merge_pairs(n_pairs: float, alpha: float, min_retention: float, judge: bool, state: dict, progress=gr.Progress()):  # noqa: B008
    """Stage 2 on the first pairs, one at a time so the page can show progress."""
    if not state or "stage1" not in state:
        raise gr.Error("Run stage 1 first.")
    pairs = state["stage1"].pairs.select(range(min(int(n_pairs), MAX_PAIRS, len(state["stage1"].pairs))))
    if len(pairs) == 0:
        raise gr.Error("Stage 1 found no pairs: lower τ or raise the budget.")
    config = dataclasses.replace(
        state["stage1"].config, max_new_tokens=256, alpha=alpha, min_retention=min_retention, judge=judge
    )
    merger = Merger(config=config)
    outcomes = []
    for index in progress.tqdm(range(len(pairs)), desc="Merging pairs"):
        outcomes.append(merger.merge([pairs[index]]))  # one session for all of them, kept open
    batch = dataclasses.replace(outcomes[0], outcomes=[o for b in outcomes for o in b.outcomes])
    state["stage1"] = dataclasses.replace(state["stage1"], config=config)
    state["merged"] = merged_pairs_dataset(pairs, pairs, batch, merger, len(pairs))
    return _merges_table(state["merged"].to_list()), state


@shown_in_page
def regate_shown(alpha: float, min_retention: float, state: dict):
    """The merges shown, decided again at the sliders' thresholds from their stored scores: no new request."""
    if not state or state.get("merged") is None:
        return gr.skip(), state
    config = dataclasses.replace(state["stage1"].config, alpha=alpha, min_retention=min_retention)
    min_judge = config.min_judge if config.judge else None
    state["merged"] = regate_pairs(state["merged"], alpha, min_retention, min_judge)
    state["stage1"] = dataclasses.replace(state["stage1"], config=config)
    return _merges_table(state["merged"].to_list()), state


def _merges_table(rows: list[dict]) -> pd.DataFrame:
    def score(value):
        return "n/a" if value is None else round(value, 2)

    def parts(row: dict, side: str) -> str:
        question, answer = row.get(f"retention_{side}_question"), row.get(f"retention_{side}_answer")
        return f"{score(question)} / {score(answer)}"

    return pd.DataFrame(
        [
            [
                row["merge_status"],
                score(row["quality_a"]),
                score(row["quality_b"]),
                score(row["quality_merged"]),
                parts(row, "a"),
                parts(row, "b"),
                score(row.get("judge_p_yes")),
                row["a_instruction"],
                row["b_instruction"],
                f"{row['merged_instruction']}\n\n{row['merged_output']}",
                row["merge_reason"],
            ]
            for row in rows
        ],
        columns=MERGE_COLUMNS,
    )


@shown_in_page
def export(state: dict):
    """Final dataset folder (parquet + card + accounting) as a zip, and the card to preview."""
    if not state or state.get("merged") is None:
        raise gr.Error("Merge some pairs first.")
    stage1, merged = state["stage1"], state["merged"]
    rest = stage1.pairs.select(range(len(merged), len(stage1.pairs)))
    if len(rest):
        merged = with_skipped(merged, rest, stage1.config, len(merged))
    result = finish_run(
        state["source"], state["report"], stage1, merged, -1, endpoint_given=bool(Merger().resolved_endpoint)
    )
    folder = Path(tempfile.mkdtemp(prefix="mergeit-"))
    save(result, folder / "dataset")
    archive = shutil.make_archive(str(folder / "mergeit-dataset"), "zip", folder / "dataset")
    return archive, str(result.card)


def backend_label() -> str:
    return (
        "a private endpoint (Space secret)" if os.environ.get("MERGEIT_ENDPOINT") else "the embedded SmolLM2-135M model"
    )


def build_app() -> gr.Blocks:
    with gr.Blocks(title="MergeIT demo") as app:
        gr.Markdown(
            "# MergeIT: from selection to merging\n"
            "Topic-aware selection, then an LLM merges similar instructions; a quality gate keeps a merge only if "
            "q(merged) > α·(q(a)+q(b)). [Paper](https://arxiv.org/abs/2503.00034). "
            f"Merges run on {backend_label()}."
        )
        state = gr.State({})
        with gr.Row():
            choice = gr.Radio(SOURCES, value=EXAMPLE, label="Data")
            upload = gr.File(
                label="JSON / JSON lines / parquet", file_types=[".json", ".jsonl", ".parquet"], type="filepath"
            )
            hub_name = gr.Textbox(label="Hub dataset name", placeholder="tatsu-lab/alpaca")
        with gr.Row():
            clusters = gr.Slider(1, 120, value=10, step=1, label="topics (k-means clusters)")
            budget = gr.Slider(0.05, 1.0, value=0.8, step=0.05, label="selection budget (fraction kept)")
            tau = gr.Slider(0.3, 0.95, value=0.6, step=0.05, label="τ (pair similarity)")
        run_button = gr.Button("1. Find topics and pairs", variant="primary", elem_id="run-stage1")
        counts = gr.Markdown(elem_id="counts")
        topic_map = gr.ScatterPlot(
            x="x",
            y="y",
            color="topic",
            tooltip=["instruction", "selected"],
            label="Topics (2-D projection of the embeddings)",
            elem_id="topic-map",
        )
        pairs = gr.Dataframe(headers=PAIR_COLUMNS, label="Pairs to merge", elem_id="pairs-table", wrap=True)
        defaults = MergeItConfig()
        with gr.Row():
            n_pairs = gr.Slider(1, MAX_PAIRS, value=3, step=1, label="pairs to merge now")
            judge = gr.Checkbox(value=False, label="also ask the judge (one more request per merge)")
            merge_button = gr.Button("2. Merge pairs", elem_id="merge")
        with gr.Row():
            # Moving these re-gates the merges shown from their stored scores: no request is sent.
            alpha = gr.Slider(0.3, 1.0, value=defaults.alpha, step=0.05, label="α (quality gate)", elem_id="alpha")
            min_retention = gr.Slider(
                0.0, 1.0, value=defaults.min_retention, step=0.05, label="min_retention", elem_id="min-retention"
            )
        merges = gr.Dataframe(headers=MERGE_COLUMNS, label="Merges beside their sources", wrap=True, elem_id="merges")
        export_button = gr.Button("3. Build the dataset and its card", elem_id="export")
        download = gr.File(label="Download (parquet + README.md card + accounting)")
        card = gr.Markdown(label="Dataset card", elem_id="card")
        run_button.click(
            run_topics,
            [choice, upload, hub_name, clusters, budget, tau, state],
            [topic_map, counts, pairs, state],
            api_name="stage1",
        )
        merge_button.click(
            merge_pairs, [n_pairs, alpha, min_retention, judge, state], [merges, state], api_name="merge"
        )
        gr.on(
            [alpha.release, min_retention.release],
            regate_shown,
            [alpha, min_retention, state],
            [merges, state],
            api_name="regate",
        )
        export_button.click(export, [state], [download, card], api_name="export")
    return app


if __name__ == "__main__":
    build_app().queue(default_concurrency_limit=1).launch(max_file_size=MAX_UPLOAD, show_error=True)
