"""Retention's judgement and its cost, per variant, side by side in one run.

Table 1, detection on the labelled set (bench/labelled/cases.jsonl: constructed classes and real merges
labelled by reading): the share of each class a variant accepts at ``min_retention`` (complete merges should
be accepted, every other class rejected). Variants:
  rows whole, MiniLM     the previous measure: each source's whole row against the whole merged row
  parts, MiniLM          question and answer apart, semantic part by the MiniLM transformer
  parts, static          the default: question and answer apart, static vectors distilled from MiniLM
  parts, lexical only    question and answer apart, semantic part left out (cosine taken as 1)
  judge                  (``--judge-model GGUF``) the LLM judge alone, P(yes) >= min_judge, in-process
Table 2, speed through the entry point users call: ``mergeit run`` on the shared Toolformer set (paper
stage 1, its MiniLM embeddings given so the runs measure stage 2) against a scripted server with 128
slots answering each request in 0.5 s (``_slot_server.py``, its own process), one run per configuration:
the server's busy share (requests × 0.5 s / 128 over the span from its first request to its last answer)
and merges a second over that span.
Run: cd bench && ../.venv/bin/python retention.py [--judge-model GGUF] [--skip-speed]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import httpx
import numpy as np
import yaml
from _common import shared_file
from labelled.build import CLASSES as CLASS_ORDER

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mergeit_hf as m
from mergeit_hf.embeddings.embedder import Embedder
from mergeit_hf.embeddings.static import StaticEmbedder
from mergeit_hf.stage2.merge.merger import Merger
from mergeit_hf.stage2.retention.measure import RetentionTexts, part_retention

HERE = Path(__file__).resolve().parent
CASES = HERE / "labelled" / "cases.jsonl"
SLOTS, LATENCY = 128, 0.5
MIN_RETENTION = m.MergeItConfig().min_retention


def whole_rows(case: dict, model: Embedder) -> float:
    """The previous release's measure: whole rows against the whole merged row and its passages."""
    rows = ["\n".join(v for v in (s["instruction"], s["input"], s["output"]) if v) for s in case["sources"]]
    merged = "\n".join(v for v in case["merged"].values() if v)
    vectors = model.encode([*rows, merged])
    cosines = vectors[: len(rows)] @ vectors[len(rows)]
    return min(
        part_retention(row, merged, cosine, [r for j, r in enumerate(rows) if j != i]).value
        for i, (row, cosine) in enumerate(zip(rows, cosines, strict=True))
    )


def by_parts(case: dict, encode) -> float:
    texts = RetentionTexts(tuple(case["sources"]), case["merged"])
    vectors = encode(texts.all_texts())
    return min(r.value for r in texts.measure(vectors))


def lexical_only(texts: list[str]) -> np.ndarray:
    """Every text the same unit vector: every cosine is 1, so the semantic part drops out."""
    return np.ones((len(texts), 1), dtype=np.float32)


def detection_table(cases: list[dict], judge_model: str | None) -> str:
    minilm = Embedder("sentence-transformers/all-MiniLM-L6-v2")
    static = StaticEmbedder("sentence-transformers/all-MiniLM-L6-v2")
    variants = {
        "rows whole, MiniLM (previous)": lambda c: whole_rows(c, minilm),
        "parts, MiniLM": lambda c: by_parts(c, minilm.encode),
        "parts, static (default)": lambda c: by_parts(c, static.encode),
        "parts, lexical only": lambda c: by_parts(c, lexical_only),
    }
    accepted: dict[str, dict[str, list[bool]]] = {name: defaultdict(list) for name in variants}
    seconds = {}
    for name, measure in variants.items():
        started = time.perf_counter()
        for case in cases:
            accepted[name][case["class"]].append(measure(case) >= MIN_RETENTION)
        seconds[name] = time.perf_counter() - started
    if judge_model:
        name = f"judge ({Path(judge_model).name}), P(yes) >= 0.5"
        started = time.perf_counter()
        verdicts = asyncio.run(judge_all(cases, judge_model))
        seconds[name] = time.perf_counter() - started
        accepted[name] = defaultdict(list)
        for case, p_yes in zip(cases, verdicts, strict=True):
            accepted[name][case["class"]].append(p_yes is not None and p_yes >= 0.5)
        dump = [{"id": c["id"], "class": c["class"], "p_yes": p} for c, p in zip(cases, verdicts, strict=True)]
        (HERE / "retention.judge.json").write_text(json.dumps(dump, indent=1))
    classes = [c for c in CLASS_ORDER if any(c == case["class"] for case in cases)]
    counts = {c: sum(case["class"] == c for case in cases) for c in classes}
    head = "| variant | " + " | ".join(f"{c} (n={counts[c]})" for c in classes) + " | seconds for all cases |"
    lines = [f"### Share of each class accepted at min_retention = {MIN_RETENTION} ({len(cases)} labelled merges)\n"]
    lines += [head, "|---" * (len(classes) + 2) + "|"]
    for name in accepted:
        cells = [f"{sum(accepted[name][c])}/{len(accepted[name][c])}" for c in classes]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {seconds[name]:.1f} |")
    lines.append("\n`complete` should be accepted (high is good); every other class should be rejected (low is good).")
    return "\n".join(lines)


async def judge_all(cases: list[dict], model: str) -> list[float | None]:
    config = m.MergeItConfig(local_model=model, judge=True, scorer_check_rows=0)
    merger = Merger(config=config, cache_dir=str(Path.home() / ".cache" / "mergeit-bench" / "requests"))
    async with merger.session() as session:
        assert session.judge is not None
        verdicts = []
        for case in cases:  # one at a time: the in-process model answers one request at a time anyway
            verdict = await session.judge.judge(case["sources"], case["merged"])
            verdicts.append(getattr(verdict, "p_yes", None))
            print(f"  judged {len(verdicts)}/{len(cases)}", end="\r", flush=True)
        return verdicts


# -- table 2: through the CLI, 128 slots, 0.5 s -----------------------------------------------------------------

SPEED_CONFIGS = {
    "retention off": {"compute_retention": False, "min_retention": 0},
    "default (parts, static vectors)": {},
    "parts, MiniLM transformer": {"retention_model": "sentence-transformers/all-MiniLM-L6-v2"},
    "default + judge": {"judge": True},
}


def with_embeddings(name: str, folder: Path) -> Path:
    """The shared file as parquet with its MiniLM ``embedding`` column, so each run skips stage 1's embedding
    (the same vectors it would compute) and the span measured is stage 2's."""
    rows, _ = m.load_rows(shared_file(name))
    embedded = rows.map(Embedder("sentence-transformers/all-MiniLM-L6-v2"), batched=True, batch_size=256)
    path = folder / f"{Path(name).stem}.parquet"
    embedded.select_columns(["instruction", "input", "output", "embedding"]).to_parquet(str(path))
    return path


def speed_table(name: str) -> str:
    server = subprocess.Popen(
        [sys.executable, str(HERE / "_slot_server.py"), str(SLOTS), str(LATENCY)], stdout=subprocess.PIPE, text=True
    )
    url = server.stdout.readline().strip()
    lines = [
        f"### `mergeit run` on {name} (paper stage 1, embeddings given), scripted server: {SLOTS} slots, "
        f"{LATENCY} s a request\n",
        "| configuration | pairs | requests | server busy span s | slots-limited ideal s | merges/s | share of ideal |",
        "|---|---|---|---|---|---|---|",
    ]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            data = with_embeddings(name, Path(tmp))
            for label, values in SPEED_CONFIGS.items():
                config = Path(tmp) / f"{len(lines)}.yaml"
                config.write_text(yaml.safe_dump(values))
                httpx.get(f"{url}/stats", params={"reset": "1"}, timeout=10)
                out, cache = Path(tmp) / f"out{len(lines)}", Path(tmp) / f"cache{len(lines)}"
                command = [sys.executable, "-m", "mergeit_hf", "run", str(data), "--output", str(out)]
                command += ["--endpoint", url, "--config", str(config), "--cache-dir", str(cache)]
                subprocess.run(command, check=True, capture_output=True, text=True)
                seen = httpx.get(f"{url}/stats", timeout=10).json()
                record = json.loads((out / "mergeit" / "run.json").read_text())
                pairs = record["counts"]["merges accepted"] + record["counts"]["merges rejected"]
                ideal, span = seen["requests"] * LATENCY / SLOTS, seen["busy_span_s"]
                lines.append(
                    f"| {label} | {pairs} | {seen['requests']} | {span:.1f} | {ideal:.1f} | {pairs / span:.1f} "
                    f"| **{ideal / span:.2f}** |"
                )
                print(lines[-1], flush=True)
    finally:
        server.kill()
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--judge-model", help="GGUF of a judge model (e.g. the Qwen 1.5B) for the judge column")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--speed-data", default="gpteacher_toolformer.json", help="shared file for table 2")
    parser.add_argument("--skip-detection", action="store_true")
    args = parser.parse_args()
    sections = []
    if not args.skip_detection:
        cases = [json.loads(line) for line in CASES.read_text().splitlines() if line.strip()]
        sections.append(detection_table(cases, args.judge_model))
        print(sections[-1], flush=True)
    if not args.skip_speed:
        sections.append(speed_table(args.speed_data))
    text = "\n\n".join(sections)
    print(text)
    (HERE / "retention.out.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
