"""Information retention: how much of each source survives in its merge, part by part.

The quality gate compares scores and cannot see a merge that silently drops a source (the paper's first
open problem), nor one that asks both questions and answers one. Each source is measured in two parts,
each against the part of the merge where it belongs:

question
    the source's instruction and input, against the merged instruction and input;
answer
    the source's output, against the merged output.

A part's retention in [0, 1] is ``number_recall × sqrt(semantic × lexical)``:

semantic
    cosine similarity (clipped at 0) of the part to the best of the merged part's passages (the whole
    part, and its paragraphs packed to 150 words, so a source restated late in a long merge is found),
    embedded by the retention model (``embeddings.static``: static vectors distilled from the stage 1
    model). It stays high for a reworded source and falls when the merge is about something else, but
    alone it cannot see a dropped source: the two sources were paired because they are similar.
lexical
    the weighted share of the part's salient items (``salient``: quotes, code, names, and the words its
    partners' same part lacks) found in the merged part; 1 when it has none.
number_recall
    the share of the part's numbers found in the merged part. It multiplies rather than averages: a
    changed number makes an answer wrong, not merely shorter. 1 without numbers.

A source's retention is its weaker part. Measured on whole rows, a question's numbers copied into the
merged instruction counted as retained even when its answer was gone; measured part by part, a merge that
asks a question and leaves it unanswered loses that source's answer, and a merge that keeps an answer to
a question it no longer asks loses that source's question. Lost items are listed numbers first, so a
rejection says what went missing and where.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from mergeit_hf.stage2.retention.salient import lexical_coverage, number_recall, numbers

Part = Literal["question", "answer"]
PARTS: tuple[Part, ...] = ("question", "answer")
LOST_ITEMS_SHOWN = 4
CHUNK_WORDS = 150
NUMBERS_VOUCH = 0.5  # the lexical coverage a part whose numbers are all kept counts at least


@dataclass(frozen=True)
class PartRetention:
    """One part of one source, measured in the merge, with the factors that explain it."""

    value: float
    semantic: float
    lexical: float | None  # None: the part has no salient item besides numbers
    number_recall: float | None  # None: the part has no number
    lost: tuple[str, ...]  # numbers first, then the heaviest items


@dataclass(frozen=True)
class SourceRetention:
    """A source's question and answer retention; the source retains what its weaker part does."""

    question: PartRetention
    answer: PartRetention

    @property
    def weaker_part(self) -> Part:
        return "answer" if self.answer.value <= self.question.value else "question"

    @property
    def weaker(self) -> PartRetention:
        return self.answer if self.weaker_part == "answer" else self.question

    @property
    def value(self) -> float:
        return self.weaker.value

    @property
    def lost(self) -> tuple[str, ...]:
        return self.weaker.lost


def part_retention(
    source_text: str, merged_text: str, cosine: float, partner_texts: Sequence[str] = (), part: Part = "question"
) -> PartRetention:
    """number_recall × sqrt(semantic × lexical), ``cosine`` being that of the two texts' embeddings.

    Two refinements, both read on real merges by the 1.5B model (bench/labelled): in an answer, the result
    (its last number) weighs as much as all its other numbers together, so a merge that skips a worked
    step (84 / 4 = 21) but keeps the result is not taken for one that changed or dropped it; and a part
    whose numbers (two or more) are all kept counts at least 0.5 lexical coverage, because a short
    arithmetic answer restated in other words ("perimeter" for "fence") keeps few of its words.
    """
    semantic = max(0.0, min(1.0, float(cosine)))
    lexical, lost_items = lexical_coverage(source_text, merged_text, partner_texts)
    recall, lost_numbers = number_recall(source_text, merged_text)
    wanted = numbers(source_text)
    if recall == 1.0 and len(wanted) >= 2 and lexical is not None:
        lexical = max(lexical, NUMBERS_VOUCH)
    if part == "answer" and recall is not None:
        recall = (recall + (wanted[-1] not in lost_numbers)) / 2
    value = (1.0 if recall is None else recall) * math.sqrt(semantic * (1.0 if lexical is None else lexical))
    return PartRetention(value, semantic, lexical, recall, (*lost_numbers, *lost_items))


def part_text(row: dict[str, str], part: Part) -> str:
    """A row's question (instruction and input, one per line) or its answer (output)."""
    if part == "answer":
        return row.get("output") or ""
    return "\n".join(text for text in (row.get("instruction"), row.get("input")) if text)


def passages(text: str, max_words: int = CHUNK_WORDS) -> list[str]:
    """``text`` whole, then its paragraphs packed up to ``max_words`` words: the passages a source part is
    compared with (an embedding of a long text is the blur of everything in it)."""
    chunks, current = [text], []
    for paragraph in (p for p in re.split(r"\n\s*\n|\n", text) if p.strip()):
        if current and len(" ".join([*current, paragraph]).split()) > max_words:
            chunks.append("\n".join(current))
            current = []
        current.append(paragraph)
    if current:
        chunks.append("\n".join(current))
    return list(dict.fromkeys(c for c in chunks if c.strip()))


@dataclass(frozen=True)
class RetentionTexts:
    """The texts one merge's retention embeds: every source part, and the passages of each merged part."""

    sources: tuple[dict[str, str], ...]
    merged: dict[str, str]

    def source_parts(self, part: Part) -> list[str]:
        return [part_text(source, part) for source in self.sources]

    def merged_passages(self, part: Part) -> list[str]:
        return passages(part_text(self.merged, part)) or [""]

    def all_texts(self) -> list[str]:
        """In the order ``measure`` reads the vectors: per part, the sources' texts then the merged passages."""
        return [text for part in PARTS for text in (*self.source_parts(part), *self.merged_passages(part))]

    def measure(self, vectors: np.ndarray) -> list[SourceRetention]:
        """Every source's retention, from the L2-normalised embeddings of ``all_texts()``."""
        measured: dict[Part, list[PartRetention]] = {}
        start = 0
        for part in PARTS:
            texts, merged = self.source_parts(part), self.merged_passages(part)
            source_vectors = vectors[start : start + len(texts)]
            passage_vectors = vectors[start + len(texts) : start + len(texts) + len(merged)]
            start += len(texts) + len(merged)
            cosines = (source_vectors @ passage_vectors.T).max(axis=1)
            merged_text = merged[0]
            measured[part] = [
                part_retention(text, merged_text, cosine, [t for j, t in enumerate(texts) if j != i], part)
                for i, (text, cosine) in enumerate(zip(texts, cosines, strict=True))
            ]
        return [SourceRetention(q, a) for q, a in zip(measured["question"], measured["answer"], strict=True)]
