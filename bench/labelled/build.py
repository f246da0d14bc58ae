"""Write bench/labelled/cases.jsonl: the constructed classes from pairs.yaml, then the real merges labelled by
reading (real.jsonl), one case per line.

A case: ``id``, ``class``, ``expected`` ("accept" or "reject"), ``origin`` ("constructed" or the model that
merged), ``sources`` (a, b: instruction / input / output), ``merged`` and, for real merges, ``note`` (why the
label). Constructed classes, from each pair's complete merge written by hand:

complete            the question asks both tasks, the answer answers both (expected: accept)
answer dropped      both asked, one answered; the dropped side alternates between b and a by pair
one source dropped  the merge is one source alone
question dropped    one source's question asked, both answers given
numbers changed     the numbers of one answer changed (+7), the question unchanged (pairs with numbers)
names swapped       the two people (or places) swapped in the answers (pairs that name two)
truncated           the complete answer cut off at 60% of its length, mid-sentence

Run: ../../.venv/bin/python build.py (from bench/labelled)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
CLASSES = (
    "complete",
    "answer dropped",
    "one source dropped",
    "question dropped",
    "numbers changed",
    "names swapped",
    "truncated",
)


def source(row: dict) -> dict[str, str]:
    return {"instruction": row["instruction"], "input": row.get("input", ""), "output": row["output"]}


def merged(instruction: str, output: str, input: str = "") -> dict[str, str]:
    return {"instruction": instruction, "input": input, "output": output}


def bump_numbers(text: str) -> str:
    return re.sub(r"\d+(?:\.\d+)?", lambda m: str(int(float(m.group())) + 7), text)


def swap(text: str, first: str, second: str) -> str:
    marker = "\x00"
    return text.replace(first, marker).replace(second, first).replace(marker, second)


def truncate(text: str, share: float = 0.6) -> str:
    cut = text[: int(len(text) * share)]
    return cut[: cut.rfind(" ")].rstrip(" ,.;:")  # mid-sentence, no closing punctuation


def constructed(pair: dict, index: int) -> list[tuple[str, str, dict[str, str]]]:
    """(class, expected, merged) for one pair."""
    a = source(pair["a"])
    question, input = pair["question"], pair.get("input", "")
    both = f"{pair['answer_a']}\n\n{pair['answer_b']}"
    kept_answer = pair["answer_a"] if index % 2 == 0 else pair["answer_b"]
    cases = [
        ("complete", "accept", merged(question, both, input)),
        ("answer dropped", "reject", merged(question, kept_answer, input)),
        ("one source dropped", "reject", merged(a["instruction"], a["output"], a["input"])),
        ("question dropped", "reject", merged(a["instruction"], both, a["input"])),
        ("truncated", "reject", merged(question, truncate(both), input)),
    ]
    changed = bump_numbers(pair["answer_b"])
    if changed != pair["answer_b"]:
        cases.append(("numbers changed", "reject", merged(question, f"{pair['answer_a']}\n\n{changed}", input)))
    if len(pair.get("names") or ()) == 2:
        cases.append(("names swapped", "reject", merged(question, swap(both, *pair["names"]), input)))
    return cases


def main() -> None:
    pairs = yaml.safe_load((HERE / "pairs.yaml").read_text())
    lines = []
    for index, pair in enumerate(pairs):
        sources = [source(pair["a"]), source(pair["b"])]
        for kind, expected, merge in constructed(pair, index):
            case_id = f"{pair['id']}/{kind.replace(' ', '-')}"
            lines.append(
                {
                    "id": case_id,
                    "class": kind,
                    "expected": expected,
                    "origin": "constructed",
                    "sources": sources,
                    "merged": merge,
                    "note": "",
                }
            )
    real = HERE / "real.jsonl"
    if real.is_file():
        lines += [json.loads(line) for line in real.read_text().splitlines() if line.strip()]
    (HERE / "cases.jsonl").write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in lines))
    counts: dict[str, int] = {}
    for case in lines:
        counts[case["class"]] = counts.get(case["class"], 0) + 1
    print(f"wrote {len(lines)} cases: {counts}")


if __name__ == "__main__":
    main()
