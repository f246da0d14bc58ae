"""What a text holds that a faithful merge keeps: its numbers and its salient items, and the share of
them another text contains.

salient items: quoted strings of at most eight words (weight 2), code identifiers: dotted names,
snake_case, camelCase, calls and backticked text (2), capitalised names inside a sentence (2), and the
text's distinctive content words (1): words of four or more letters, not stop words, compared after light
suffix stripping. Only what its partners do not contain counts: what this text adds to the pair.
numbers: formats normalised ("6,000" = "6000", "2.50" = "2.5"; list markers such as "1." at a line
start are not numbers).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

ItemKind = str
WEIGHTS: dict[ItemKind, float] = {"quoted": 2.0, "code": 2.0, "name": 2.0, "word": 1.0}
MAX_QUOTED_WORDS = 8

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
    well want know sure they're imagine pretend role roleplay take suppose
"""
STOP_WORDS = frozenset(_STOP_WORD_TEXT.split())


def normalise_number(text: str) -> str:
    """'6,000' → '6000', '2.50' → '2.5', '+3' → '3', '40%' → '40%'."""
    percent = "%" if text.endswith("%") else ""
    digits = text.rstrip("%").lstrip("+").replace(",", "").replace("_", "")
    if "." in digits:
        digits = digits.rstrip("0").rstrip(".")
    return digits + percent


@functools.lru_cache(maxsize=65536)  # a vocabulary's worth: every merge reads the same words again
def _stem(word: str) -> str:
    """Light suffix stripping, so "reverse", "reverses" and "reversing" compare equal."""
    word = word.lower()
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 4:
            word = word[: -len(suffix)]
            break
    return word[:-1] if word.endswith("e") and len(word) > 4 else word


def _words(text: str) -> dict[str, str]:
    """Stem → the first form it appeared in (shown when the word is lost). Read-only: it is cached."""
    return _cached_words(text)


@functools.lru_cache(maxsize=8192)  # the merged text and the partners' texts are read once per part and side
def _cached_words(text: str) -> dict[str, str]:
    words: dict[str, str] = {}
    for word in _WORD.findall(text):
        if word.lower() not in STOP_WORDS:
            words.setdefault(_stem(word), word.lower())
    return words


def numbers(text: str) -> list[str]:
    """The normalised numbers of ``text`` in order of appearance, once each, list markers left out."""
    return list(_numbers(text))


@functools.lru_cache(maxsize=8192)
def _numbers(text: str) -> tuple[str, ...]:
    found = (normalise_number(m.group()) for m in _NUMBER.finditer(_LIST_MARKER.sub(" ", text)))
    return tuple(dict.fromkeys(found))


def salient_items(text: str, partner_texts: Sequence[str] = ()) -> dict[str, ItemKind]:
    """Salient item (normalised) → its kind; content words only where no partner contains them.
    Numbers are not among them: ``numbers`` finds those."""
    return dict(_salient_items(text, tuple(partner_texts)))


@functools.lru_cache(maxsize=8192)  # a source's items are read again for every attempt and every part
def _salient_items(text: str, partner_texts: tuple[str, ...]) -> tuple[tuple[str, ItemKind], ...]:
    items: dict[str, ItemKind] = {}
    partners = "\n".join(partner_texts)
    partners_folded = " ".join(partners.lower().split())
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
    # What a partner also holds is not what this text adds: "Python" in two Python questions proves nothing.
    shared = {item for item, kind in items.items() if kind != "word" and _found(item, kind, partners, partners_folded)}
    return tuple((item, kind) for item, kind in items.items() if item not in shared)


def _found(
    item: str, kind: ItemKind, merged_text: str, merged_folded: str, merged_words: set[str] = frozenset()
) -> bool:
    """Words by stem, code as written, quotes and names case- and spacing-folded (``merged_folded``)."""
    if kind == "word":
        return item in merged_words
    if kind == "code":
        return item in merged_text
    return item in merged_folded


def lexical_coverage(
    source_text: str, merged_text: str, partner_texts: Sequence[str] = ()
) -> tuple[float | None, list[str]]:
    """Weighted share of the source's salient items found in the merge, and the lost ones (heaviest first)."""
    items = salient_items(source_text, partner_texts)
    if not items:
        return None, []
    merged_words = set(_words(merged_text))
    merged_folded = " ".join(merged_text.lower().split())
    total = kept = 0.0
    lost: list[tuple[float, str]] = []
    for item, kind in items.items():
        weight = WEIGHTS[kind]
        total += weight
        if _found(item, kind, merged_text, merged_folded, merged_words):
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
