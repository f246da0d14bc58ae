"""Information retention: how much of each source survives in its merge.

The quality gate compares scores and cannot see a merge that silently drops one source (the paper's first
open problem). ``retention(source, merged, partners)`` in [0, 1] is

    retention = number_recall × sqrt(semantic × lexical)

semantic
    cosine similarity (clipped at 0) of the source's text (instruction + input + output) to the
    merged row, embedded by the stage 1 model: the best over the whole merged text and its passages
    (instruction with input, output paragraphs packed to 150 words), because all-MiniLM-L6-v2 reads only
    the first 256 word pieces and a source restated late in a long merge would otherwise be unseen.
    It stays high for a reworded source and falls when the merge is about something else, but alone it
    cannot see a dropped source: the two sources were paired because they are similar.
lexical
    the weighted share of the source's salient items found in the merged text: quoted strings of at
    most eight words (weight 2), code identifiers: dotted names, snake_case, camelCase, calls and
    backticked text (2), capitalised names inside a sentence (2), and the source's distinctive content
    words (1): words of four or more letters, not stop words, that its partner does not contain (what
    this source adds to the pair), compared after light suffix stripping. With no such item, lexical
    is 1 and the semantic coverage speaks alone.
number_recall
    the share of the source's numbers found in the merge, formats normalised ("6,000" = "6000",
    "2.50" = "2.5"; list markers such as "1." at a line start are not numbers). It multiplies rather
    than averages: a changed number makes an answer wrong, not merely shorter. 1 without numbers.

A merge that keeps one source and drops the other keeps the dropped side's semantic coverage (same topic)
but loses its names, distinctive words and numbers; a merge that changes a source's numbers loses the
number factor. Both fall below ``min_retention`` (README, measured table). Lost items are listed
numbers first, so a rejection says what went missing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ItemKind = str
WEIGHTS: dict[ItemKind, float] = {"quoted": 2.0, "code": 2.0, "name": 2.0, "word": 1.0}
MAX_QUOTED_WORDS = 8
LOST_ITEMS_SHOWN = 4
CHUNK_WORDS = 150

_LIST_MARKER = re.compile(r"^\s*\d+[.)](?=\s)", re.MULTILINE)
_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d{1,3}(?:[,_]\d{3})+|\d+)(?:\.\d+)?%?")
_QUOTED = re.compile(r"\"([^\"\n]{1,120})\"|“([^”\n]{1,120})”|(?<![A-Za-z])'([^'\n]{1,120})'(?![A-Za-z])")
_BACKTICKED = re.compile(r"`([^`\n]{1,80})`")
_DOTTED = re.compile(r"\b[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+\b")
_MISSING_SPACE = re.compile(r"[a-z]+\.[A-Z][a-z]*")  # "minds.The": prose missing a space, not code
_SNAKE = re.compile(r"\b[A-Za-z][A-Za-z0-9]*_[A-Za-z0-9_]+\b")
_CAMEL = re.compile(r"\b[a-z]+[A-Z][A-Za-z0-9]*\b")
_CALL = re.compile(r"\b([A-Za-z_][A-Za-z0-9_]*)\(")
_NAME = re.compile(r"(?<=[a-z,;:] )[A-Z][a-z]+(?: [A-Z][a-z]+)*")
_WORD = re.compile(r"[A-Za-z][a-z]{3,}")
_UNITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
NUMBER_WORDS = {word: str(value) for value, word in enumerate(_UNITS)} | {
    "twenty": "20",
    "thirty": "30",
    "forty": "40",
    "fifty": "50",
    "hundred": "100",
    "thousand": "1000",
}
_SUFFIXES = ("ing", "ed", "es", "ly", "s")
_STOP_WORD_TEXT = """
    about above after again against also another because been before being below between both could
    does doing down during each even every from further have having here however into itself just
    like made make many more most much must only other over same should since some such than that
    their them then there these they this those through under until upon very was were what when
    where which while will with within without would your yours yourself please write give provide
    create describe explain following answer question example examples task using based given need
    well want know sure they're
"""
STOP_WORDS = frozenset(_STOP_WORD_TEXT.split())


@dataclass(frozen=True)
class Retention:
    """One source's retention in a merge, with the parts that explain it."""

    value: float
    semantic: float
    lexical: float | None  # None: the source has no salient item besides numbers
    number_recall: float | None  # None: the source has no number
    lost: tuple[str, ...]  # numbers first, then the heaviest items


def normalise_number(text: str) -> str:
    """'6,000' → '6000', '2.50' → '2.5', '+3' → '3', '40%' → '40%'."""
    percent = "%" if text.endswith("%") else ""
    digits = text.rstrip("%").lstrip("+").replace(",", "").replace("_", "")
    if "." in digits:
        digits = digits.rstrip("0").rstrip(".")
    return digits + percent


def _stem(word: str) -> str:
    """Light suffix stripping, so "reverse", "reverses" and "reversing" compare equal."""
    word = word.lower()
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 4:
            word = word[: -len(suffix)]
            break
    return word[:-1] if word.endswith("e") and len(word) > 4 else word


def _words(text: str) -> dict[str, str]:
    """Stem → the first form it appeared in (shown when the word is lost)."""
    words: dict[str, str] = {}
    for word in _WORD.findall(text):
        if word.lower() not in STOP_WORDS:
            words.setdefault(_stem(word), word.lower())
    return words


def numbers(text: str) -> list[str]:
    """The normalised numbers of ``text`` in order of appearance, once each, list markers left out."""
    found = (normalise_number(m.group()) for m in _NUMBER.finditer(_LIST_MARKER.sub(" ", text)))
    return list(dict.fromkeys(found))


def salient_items(text: str, partner_texts: Sequence[str] = ()) -> dict[str, ItemKind]:
    """Salient item (normalised) → its kind; content words only where no partner contains them.
    Numbers are not among them: ``numbers`` finds those."""
    items: dict[str, ItemKind] = {}
    for match in _QUOTED.finditer(text):
        quoted = next(g for g in match.groups() if g is not None).strip()
        if quoted and len(quoted.split()) <= MAX_QUOTED_WORDS:
            items.setdefault(" ".join(quoted.lower().split()), "quoted")
    for pattern in (_BACKTICKED, _DOTTED, _SNAKE, _CAMEL, _CALL):
        for match in pattern.finditer(text):
            item = (match.group(1) if pattern.groups else match.group()).strip()
            if not _MISSING_SPACE.fullmatch(item):
                items.setdefault(item, "code")
    for match in _NAME.finditer(text):
        items.setdefault(match.group().lower(), "name")
    partner_words = set().union(*(_words(t) for t in partner_texts)) if partner_texts else set()
    for stem in _words(text):
        if stem not in partner_words:
            items.setdefault(stem, "word")
    return items


def _found(item: str, kind: ItemKind, merged_text: str, merged_words: set[str]) -> bool:
    if kind == "word":
        return item in merged_words
    if kind == "code":
        return item in merged_text
    return item in " ".join(merged_text.lower().split())


def lexical_coverage(
    source_text: str, merged_text: str, partner_texts: Sequence[str] = ()
) -> tuple[float | None, list[str]]:
    """Weighted share of the source's salient items found in the merge, and the lost ones (heaviest first)."""
    items = salient_items(source_text, partner_texts)
    if not items:
        return None, []
    merged_words = _words(merged_text)
    total = kept = 0.0
    lost: list[tuple[float, str]] = []
    for item, kind in items.items():
        weight = WEIGHTS[kind]
        total += weight
        if _found(item, kind, merged_text, merged_words):
            kept += weight
        else:
            lost.append((weight, item))
    lost.sort(key=lambda pair: -pair[0])  # stable: quotes, code and names, then words in text order
    surfaces = _words(source_text)
    return kept / total, [surfaces.get(item, item) if items[item] == "word" else item for _, item in lost]


def number_recall(source_text: str, merged_text: str) -> tuple[float | None, list[str]]:
    """Share of the source's numbers found in the merge (None without numbers), and the lost ones.

    The merge may spell a number out ("one" for "1"); the source's words are never read as numbers,
    since "one" is as often a pronoun."""
    wanted = numbers(source_text)
    if not wanted:
        return None, []
    spelled = {NUMBER_WORDS[w] for w in re.findall(r"[a-z]+", merged_text.lower()) if w in NUMBER_WORDS}
    present = set(numbers(merged_text)) | spelled
    lost = [n for n in wanted if n not in present]
    return 1 - len(lost) / len(wanted), lost


def retention(source_text: str, merged_text: str, cosine: float, partner_texts: Sequence[str] = ()) -> Retention:
    """number_recall × sqrt(semantic × lexical), ``cosine`` being that of the two texts' embeddings."""
    semantic = max(0.0, min(1.0, float(cosine)))
    lexical, lost_items = lexical_coverage(source_text, merged_text, partner_texts)
    recall, lost_numbers = number_recall(source_text, merged_text)
    value = (1.0 if recall is None else recall) * math.sqrt(semantic * (1.0 if lexical is None else lexical))
    return Retention(value, semantic, lexical, recall, (*lost_numbers, *lost_items))


def row_text(row: dict[str, str]) -> str:
    """The text a retention is measured on: instruction, input and output, one per line."""
    return "\n".join(part for part in (row.get("instruction"), row.get("input"), row.get("output")) if part)


def merged_chunks(merged: dict[str, str], max_words: int = CHUNK_WORDS) -> list[str]:
    """The merged row as passages an embedding model reads whole: the full text, the instruction with its
    input, and the output's paragraphs packed up to ``max_words`` words."""
    chunks = [row_text(merged), "\n".join(p for p in (merged.get("instruction"), merged.get("input")) if p)]
    current: list[str] = []
    for paragraph in (p for p in re.split(r"\n\s*\n|\n", merged.get("output") or "") if p.strip()):
        if current and len(" ".join([*current, paragraph]).split()) > max_words:
            chunks.append("\n".join(current))
            current = []
        current.append(paragraph)
    if current:
        chunks.append("\n".join(current))
    return list(dict.fromkeys(c for c in chunks if c.strip()))


def source_retentions(
    sources: Sequence[dict[str, str]], merged: dict[str, str], source_vectors: np.ndarray, chunk_vectors: np.ndarray
) -> list[Retention]:
    """Retention of every source; vectors are L2-normalised embeddings of the sources and of ``merged_chunks``.

    The semantic coverage is the best cosine over the chunks, so a source restated late in a long merge
    is still seen (the embedding model reads only the first 256 word pieces of a text)."""
    texts = [row_text(s) for s in sources]
    merged_text = row_text(merged)
    cosines = (source_vectors @ chunk_vectors.T).max(axis=1)
    return [
        retention(text, merged_text, cosine, [t for j, t in enumerate(texts) if j != i])
        for i, (text, cosine) in enumerate(zip(texts, cosines, strict=True))
    ]
