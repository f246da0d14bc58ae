"""``mergeit``: run both stages on a file or Hub dataset, write data and card, optionally publish."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from mergeit_hf.config import MergeItConfig
from mergeit_hf.errors import ConfigError, MergeItError

EXIT_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergeit", description="MergeIT data curation for Hugging Face datasets.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run both stages and write the dataset folder")
    run.add_argument("input", help="JSON / JSON lines / parquet file, or a Hub dataset name")
    run.add_argument("--output", required=True, type=Path, help="folder for data, card and run record")
    run.add_argument("--endpoint", help="TGI-compatible URL (else MERGEIT_ENDPOINT, else the embedded model)")
    run.add_argument("--config", type=Path, help="YAML or JSON file of MergeItConfig parameters")
    run.add_argument("--preset", choices=["paper", "authors_scripts"], default=None, help="start from a preset")
    run.add_argument(
        "--format", dest="input_format", default="auto", choices=["auto", "alpaca", "sharegpt", "seed_tasks"]
    )
    run.add_argument(
        "--column",
        action="append",
        default=[],
        metavar="FIELD=NAME",
        help="map instruction/input/output to your column names, e.g. --column output=response",
    )
    run.add_argument("--push-to-hub", metavar="REPO", help="publish to this Hub dataset repo")
    run.add_argument("--private", action="store_true", help="create the Hub repo as private")
    run.add_argument("--cache-dir", help="request cache folder (default: MERGEIT_CACHE or ~/.cache/mergeit-hf)")
    run.add_argument("--no-cache", action="store_true", help="keep no request cache (no resume)")
    run.add_argument("--max-pairs", type=int, help="merge at most this many pairs (others are kept unmerged)")
    run.add_argument("--license", help="license of the output (carry the source's)")
    run.add_argument("--pretty-name", help="dataset name shown on the card")
    run.add_argument("--general-size", type=int, help="|G| for the card's merge weight ω = |D|/|G|")
    run.add_argument("--dry-run", action="store_true", help="run stage 1 and report the LLM calls, make none")
    card = commands.add_parser("card", help="render README.md of an output folder again")
    card.add_argument("folder", type=Path)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "card":
            from mergeit_hf.pipeline import render_card_again

            render_card_again(args.folder)
            print(f"wrote {args.folder / 'README.md'}")
            return 0
        return _run(args)
    except (MergeItError, KeyError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume from the request cache", file=sys.stderr)
        return 130


def _config(args: argparse.Namespace) -> MergeItConfig:
    values = {}
    if args.config:
        values = MergeItConfig.from_file(args.config).to_dict()
    if args.preset == "authors_scripts":
        return MergeItConfig.authors_scripts(**{k: v for k, v in values.items() if k != "preset"})
    return MergeItConfig.from_dict(values) if values else MergeItConfig()


def _column_map(pairs: list[str]) -> dict[str, str]:
    mapping = {}
    for pair in pairs:
        field, sep, name = pair.partition("=")
        if not sep or not name:
            raise ConfigError(f"--column takes FIELD=NAME (e.g. output=response), got {pair!r}")
        mapping[field] = name
    return mapping


def _run(args: argparse.Namespace) -> int:
    from mergeit_hf import pipeline

    config = _config(args)
    column_map = _column_map(args.column)
    if args.dry_run:
        report, stage1 = pipeline.plan(args.input, config, column_map=column_map, input_format=args.input_format)
        print(report.summary())
        print(stage1.summary())
        pairs = stage1.n_pairs if args.max_pairs is None else min(args.max_pairs, stage1.n_pairs)
        print(
            f"dry run: {pairs} pairs to merge → {pairs * 4} LLM calls (1 merge + 3 quality scores per pair), "
            f"up to {pairs * (4 + config.parse_retries)} with parse retries; none made"
        )
        return 0
    endpoint = args.endpoint or os.environ.get("MERGEIT_ENDPOINT")
    print(f"LLM: {endpoint or 'embedded llama.cpp model (no endpoint given)'}", file=sys.stderr)
    result = pipeline.run_pipeline(
        args.input,
        config,
        endpoint=endpoint,
        cache_dir=args.cache_dir,
        use_cache=not args.no_cache,
        column_map=column_map,
        input_format=args.input_format,
        max_pairs=args.max_pairs,
        license=args.license,
        pretty_name=args.pretty_name,
        general_size=args.general_size,
    )
    print(result.report.summary())
    written = pipeline.save(result, args.output)
    if args.push_to_hub:
        commit = pipeline.publish(result, args.push_to_hub, private=args.private)
        print(f"published to {args.push_to_hub}: {getattr(commit, 'commit_url', commit)}")
    print(result.summary_table())
    print(f"wrote {len(written)} files to {args.output} (card: {args.output / 'README.md'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
