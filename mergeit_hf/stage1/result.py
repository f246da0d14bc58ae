"""What stage 1 leaves for stage 2 and the card: every valid row with its columns, the selection, the pairs."""

from __future__ import annotations

from dataclasses import dataclass, field

from datasets import Dataset

from mergeit_hf.config import MergeItConfig
from mergeit_hf.embeddings.arrow import column_values
from mergeit_hf.stage1.selection import SelectionPlan
from mergeit_hf.stage1.topics import TopicClusters


@dataclass
class Stage1Result:
    """Every valid row with its stage 1 columns, the selected subset and the pairs found in it."""

    rows: Dataset  # id, instruction, input, output, source_index, embedding, cluster_id, selected, rank
    selected: Dataset
    pairs: Dataset
    topics: TopicClusters | None  # None: stage 1 ran in a script, step by step (``finish``)
    plan: SelectionPlan | None
    config: MergeItConfig
    seconds: dict[str, float] = field(default_factory=dict)
    embedding_source: str = ""  # what made the embeddings: the model and device, or the input's column

    @property
    def n_rows(self) -> int:
        return len(self.rows)

    @property
    def n_selected(self) -> int:
        return len(self.selected)

    @property
    def n_pairs(self) -> int:
        return len(self.pairs)

    @property
    def n_paired_rows(self) -> int:
        return int(sum(self.pairs["group_size"])) if len(self.pairs) else 0

    @property
    def n_unpaired_selected(self) -> int:
        return self.n_selected - self.n_paired_rows

    def conversation_counts(self) -> dict[str, int]:
        """The card's lines for conversations (none for Alpaca rows): rows under a system prompt, multi-turn
        conversations among the valid rows, and those selected (kept whole, never merged)."""
        counts = {}
        if "system" in self.rows.column_names:
            counts["rows with a system prompt"] = sum(bool(s) for s in column_values(self.rows, "system"))
        if "multi_turn" in self.rows.column_names:
            counts["multi-turn conversations"] = sum(column_values(self.rows, "multi_turn"))
            counts["multi-turn kept (not merged)"] = sum(column_values(self.selected, "multi_turn"))
        return {name: int(count) for name, count in counts.items() if count}

    @property
    def _unit(self) -> str:
        return "pairs" if self.config.max_group_size == 2 else f"groups of 2-{self.config.max_group_size}"

    def summary(self) -> str:
        return (
            f"{self.n_rows} rows → {self.topics.n_clusters if self.topics else '?'} topics "
            f"({self.topics.method if self.topics else 'given'}) → "
            f"{self.n_selected} selected → {self.n_pairs} {self._unit} at τ={self.config.tau} "
            f"({self.n_paired_rows} rows paired, {self.n_unpaired_selected} selected rows unpaired)"
        )
