"""``mergeit``: run both stages on a file or Hub dataset, write data and card, optionally publish."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, get_args

from mergeit_hf.config import MergeItConfig
from mergeit_hf.engines.choice import ENGINES, Engine
from mergeit_hf.errors import ConfigError, MergeItError
from mergeit_hf.inputs.loading import InputFormat

if TYPE_CHECKING:
    from mergeit_hf.run.request_plan import RequestPlan

EXIT_ERROR = 2
INPUT_FORMATS = list(get_args(InputFormat))  # auto, alpaca, messages, sharegpt, seed_tasks
SCORER_HELP = (
    "quality scorer of its own (e.g. the Deita scorer behind vLLM/TGI), sent Deita's prompt as a raw completion "
    "(else MERGEIT_SCORER_ENDPOINT, else the merge model scores)"
)

ENDPOINT_HELP = (
    "server URL, with or without /v1: TGI, vLLM, SGLang, llama.cpp or an OpenAI-compatible API "
    "(else MERGEIT_ENDPOINT, else the embedded model); its key: MERGEIT_API_KEY, else HF_TOKEN"
)
MODEL_HELP = (
    "model every merge request names (else MERGEIT_MODEL, else TGI's /info model, else the one /v1/models lists)"
)
PROVIDER_HELP = "HF Inference Providers (auto, together, fireworks-ai, ...) for --model org/name, with the HF token"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergeit", description="MergeIT data curation for Hugging Face datasets.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run both stages and write the dataset folder")
    run.add_argument("input", help="JSON / JSON lines / parquet file, or a Hub dataset name")
    run.add_argument("--output", required=True, type=Path, help="folder for data, card and run record")
    _add_endpoint_options(run)
    run.add_argument("--config", type=Path, help="YAML or JSON file of MergeItConfig parameters")
    run.add_argument("--preset", choices=["paper", "authors_scripts"], default=None, help="start from a preset")
    run.add_argument("--format", dest="input_format", default="auto", choices=INPUT_FORMATS)
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
    run.add_argument(
        "--batch", action="store_true", help="stage 2 through the endpoint's OpenAI-compatible batch API, in rounds"
    )
    run.add_argument(
        "--batch-enqueued-tokens",
        type=int,
        metavar="N",
        help="with --batch: your tier's enqueued-token limit for the model; files stay under it, one at a time",
    )
    run.add_argument(
        "--engine", default="datasets", choices=ENGINES, help="datasets (one machine) or ray (a Ray cluster)"
    )
    run.add_argument("--ray-address", help="Ray cluster to join with --engine ray (default: RAY_ADDRESS, else local)")
    run.add_argument(
        "--merge-actors", type=int, help="with --engine ray: merge actors sharing the endpoint (default: CPUs / 2)"
    )
    _add_gate_options(run)
    run.add_argument(
        "--judge", action="store_true", default=None, help="also ask an LLM whether each merge answers all it asks"
    )
    run.add_argument("--judge-endpoint", help="chat server of its own for the judge (default: the scorer's)")
    run.add_argument("--judge-model", help="model the judge endpoint's requests name (as --model)")
    run.add_argument("--local-model", help="GGUF path or REPO_ID:FILENAME for the embedded model")
    run.add_argument("--gate-retries", type=int, help="new merges asked for when the gate rejects one")
    run.add_argument("--no-scorer-check", action="store_true", help="skip the scorer check at the start of stage 2")
    status = commands.add_parser("batch-status", help="where a `mergeit run --batch` stands: rounds and batches")
    status.add_argument("folder", type=Path, help="the --output folder of `mergeit run --batch`")
    status.add_argument("--offline", action="store_true", help="what the folder records only; ask the provider nothing")
    card = commands.add_parser("card", help="render README.md of an output folder again")
    card.add_argument("folder", type=Path)

    check = commands.add_parser("check-scorer", help="does the quality scorer rank real answers above broken ones?")
    check.add_argument("input", help="JSON / JSON lines / parquet file, or a Hub dataset name")
    _add_endpoint_options(check)
    check.add_argument("--rows", type=int, default=32, help="real rows to score with their corruptions (32)")
    check.add_argument("--strict", action="store_true", help="exit non-zero when accuracy is below the threshold")
    check.add_argument("--min-accuracy", type=float, help="threshold (default 0.7)")
    check.add_argument("--config", type=Path, help="YAML or JSON file of MergeItConfig parameters")
    check.add_argument("--local-model", help="GGUF path or REPO_ID:FILENAME for the embedded model")
    check.add_argument("--cache-dir", help="request cache folder")
    check.add_argument("--format", dest="input_format", default="auto", choices=INPUT_FORMATS)
    check.add_argument("--column", action="append", default=[], metavar="FIELD=NAME")

    sweep = commands.add_parser("sweep", help="acceptance over a grid of α and min_retention, from stored scores")
    sweep.add_argument("folder", type=Path, help="the --output folder of `mergeit run`")
    sweep.add_argument("--alphas", type=_floats, help="comma-separated α values (default 0.4 to 0.9 by 0.05)")
    sweep.add_argument("--retentions", type=_floats, help="comma-separated min_retention values")
    sweep.add_argument("--min-judge", type=float, help="the judge's P(yes) held at this (default: the run's)")

    space = commands.add_parser(
        "publish-space", help="publish the demo Space with a wheel of this package its requirements name"
    )
    space.add_argument("repo_id", help="OWNER/NAME of the Gradio Space")
    space.add_argument("--space-dir", type=Path, default=Path("spaces/mergeit-demo"), help="the Space's folder")
    space.add_argument("--project", type=Path, default=Path("."), help="the checkout to build the wheel from")
    space.add_argument("--private", action="store_true")
    regate = commands.add_parser("regate", help="rewrite data, accounting and card for new thresholds, no requests")
    regate.add_argument("folder", type=Path, help="the --output folder of `mergeit run`")
    _add_gate_options(regate)
    return parser


def _add_endpoint_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint", help=ENDPOINT_HELP)
    parser.add_argument("--model", help=MODEL_HELP)
    parser.add_argument("--provider", help=PROVIDER_HELP)
    parser.add_argument("--scorer-endpoint", help=SCORER_HELP)
    parser.add_argument("--scorer-model", help="model the scorer endpoint's requests name (as --model)")


def _add_gate_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--alpha", type=float, help="quality gate: q(merged) > alpha·(q(a)+q(b))")
    parser.add_argument("--min-retention", type=float, help="each source's retention must reach this (0 to 1)")
    parser.add_argument("--min-judge", type=float, help="with the judge: the P(yes) a merge needs (0 to 1)")


def _floats(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "card":
            from mergeit_hf.output.folder import render_card_again

            render_card_again(args.folder)
            print(f"wrote {args.folder / 'README.md'}")
            return 0
        commands = {
            "run": _run,
            "check-scorer": _check_scorer,
            "sweep": _sweep,
            "regate": _regate,
            "publish-space": _publish_space,
            "batch-status": _batch_status,
        }
        return commands[args.command](args)
    except (MergeItError, KeyError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        for note in getattr(exc, "__notes__", ()):  # how to resume, where answers were received (``pipeline``)
            print(note, file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume from the request cache", file=sys.stderr)
        return 130


def _config(args: argparse.Namespace) -> MergeItConfig:
    values = {}
    if args.config:
        values = MergeItConfig.from_file(args.config).to_dict()
    flags = {
        "alpha": getattr(args, "alpha", None),
        "min_retention": getattr(args, "min_retention", None),
        "judge": getattr(args, "judge", None),
        "judge_endpoint": getattr(args, "judge_endpoint", None),
        "judge_model": getattr(args, "judge_model", None),
        "min_judge": getattr(args, "min_judge", None),
        "gate_retries": getattr(args, "gate_retries", None),
        "local_model": getattr(args, "local_model", None),
        "scorer_endpoint": getattr(args, "scorer_endpoint", None),
        "model": getattr(args, "model", None),
        "scorer_model": getattr(args, "scorer_model", None),
        "provider": getattr(args, "provider", None),
        "scorer_check_rows": 0 if getattr(args, "no_scorer_check", False) else None,
        "scorer_check_min_accuracy": getattr(args, "min_accuracy", None),
        "batch": True if getattr(args, "batch", False) else None,
        "batch_enqueued_tokens": getattr(args, "batch_enqueued_tokens", None),
    }
    values.update({name: value for name, value in flags.items() if value is not None})
    if flags["batch_enqueued_tokens"] is not None and not values.get("batch"):
        raise ConfigError("--batch-enqueued-tokens sizes batch files: add --batch (or config batch: true), or drop it")
    if getattr(args, "preset", None) == "authors_scripts":
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
    from mergeit_hf.run import pipeline

    config = _config(args)
    column_map = _column_map(args.column)
    engine = Engine(args.engine, args.ray_address, args.merge_actors)
    print(engine.start(), file=sys.stderr)
    if args.dry_run:
        report, stage1 = pipeline.plan(
            args.input, config, column_map=column_map, input_format=args.input_format, engine=engine
        )
        print(report.summary())
        if config.prefilter_top is not None:
            from mergeit_hf.stage2.prefilter import prefilter_count

            keep = prefilter_count(config.prefilter_top, report.rows_valid)
            print(
                f"prefilter: {2 * report.rows_valid} LLM calls (quality and complexity of every valid row) to keep "
                f"the top {keep}; the stage 1 figures below are for all valid rows, before it"
            )
        print(stage1.summary())
        groups = stage1.pairs.select(
            range(stage1.n_pairs if args.max_pairs is None else min(args.max_pairs, stage1.n_pairs))
        )
        merges, scores = len(groups), len(groups) + (sum(groups["group_size"]) if len(groups) else 0)
        attempts = config.gate_retries + 1
        check = 4 * min(config.scorer_check_rows, stage1.n_selected) if merges else 0
        most = merges * attempts * (1 + config.parse_retries) + scores + merges * config.gate_retries
        print(
            f"dry run: {merges} merges → {merges + scores + check} LLM calls ({merges} merges, {scores} quality "
            f"scores of sources and merges, {check} for the scorer check), up to {most + check} with parse and gate "
            "retries; none made"
        )
        plan = _print_request_plan(groups, config, args)
        if config.batch:
            rounds, judged = 2 + config.gate_retries * 2, " and judgements" if config.judge else ""
            print(
                f"with --batch: {rounds} rounds at the least if every answer parses ({merges} merges and "
                f"{scores - merges} source scores in the first, {merges} merge scores{judged} in the "
                "second, each gate retry two more); parse retries and failed lines add a round each; the scorer "
                f"check's {check} requests are sent synchronously before the first"
            )
            if config.batch_enqueued_tokens:
                first = plan.merge_prompt_tokens + plan.score_prompt_tokens
                files = max(1, -(-first // config.batch_enqueued_tokens))
                print(
                    f"the first round's {first:,} prompt tokens go in {files} file(s) at the least under "
                    f"batch_enqueued_tokens ({config.batch_enqueued_tokens:,}), one batch at a time (the split "
                    "over-counts tokens, so expect more)"
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
        engine=engine,
        on_loaded=lambda report: print(report.summary(), flush=True),
        output=args.output,
    )
    written = pipeline.save(result, args.output)
    if args.push_to_hub:
        commit = pipeline.publish(result, args.push_to_hub, private=args.private)
        print(f"published to {args.push_to_hub}: {getattr(commit, 'commit_url', commit)}")
    print(result.summary_table())
    print(f"wrote {len(written)} files to {args.output} (card: {args.output / 'README.md'})")
    return 0


def _print_request_plan(groups, config: MergeItConfig, args: argparse.Namespace) -> RequestPlan:
    from mergeit_hf.endpoints.servers.local_llama import resolve_local_model
    from mergeit_hf.run.request_plan import plan_requests, token_counter

    endpoint = args.endpoint or os.environ.get("MERGEIT_ENDPOINT")
    embedded = endpoint is None and config.provider is None
    model = (
        resolve_local_model(config.local_model).name if embedded else config.model or os.environ.get("MERGEIT_MODEL")
    )
    count, counted_with = token_counter(endpoint, config)
    plan = plan_requests(groups, config, model, count, counted_with)
    print(plan.report())
    if plan.example:
        where = endpoint or (f"HF Inference Providers ({config.provider})" if config.provider else "the embedded model")
        print(f"the first merge request for {where}, before it is written in that server's dialect:")
        print(json.dumps(plan.example, indent=2, ensure_ascii=False))
    return plan


def _batch_status(args: argparse.Namespace) -> int:
    from mergeit_hf.run.batch_status import batch_status

    print(batch_status(args.folder, ask_provider=not args.offline))
    return 0


def _check_scorer(args: argparse.Namespace) -> int:
    from mergeit_hf.inputs.loading import load_rows
    from mergeit_hf.stage2.merge.merger import Merger
    from mergeit_hf.stage2.scorer_check import run_scorer_check

    if args.rows < 2:
        raise ConfigError(f"--rows must be at least 2, got {args.rows}")
    config = _config(args)
    rows, _ = load_rows(args.input, input_format=args.input_format, column_map=_column_map(args.column))
    merger = Merger(endpoint=args.endpoint, config=config, cache_dir=args.cache_dir)
    check = run_scorer_check(rows.select_columns(["instruction", "input", "output"]).to_list(), merger, args.rows)
    print(check.report())
    return 1 if args.strict and not check.passed else 0


def _sweep(args: argparse.Namespace) -> int:
    from mergeit_hf.output import figures, sweep
    from mergeit_hf.output.folder import OutputFolder

    out = OutputFolder.open(args.folder)
    pairs = sweep.scored_pairs(out.pairs)
    if not pairs:
        raise MergeItError(f"{args.folder} holds no scored pair (no merge was accepted or rejected): nothing to sweep")
    min_judge = out.min_judge if args.min_judge is None else args.min_judge
    sweep.require_measured(pairs, args.min_judge, min_retention_given=bool(args.retentions))
    alphas, retentions = args.alphas or sweep.DEFAULT_ALPHAS, args.retentions or sweep.DEFAULT_RETENTIONS
    table = sweep.sweep(pairs, alphas, retentions, out.thresholds, min_judge)
    if min_judge is not None:
        print(f"the judge's P(yes) held at >= {min_judge}")
    print(f"accepted merges (rate) of {table.n_scored} scored pairs; ← this run's setting\n")
    print(table.render())
    image = args.folder / "mergeit" / figures.SWEEP_FIGURE
    image.write_bytes(figures.sweep_figure(table))
    print(f"\nwrote {image}")
    return 0


def _regate(args: argparse.Namespace) -> int:
    from mergeit_hf.output.folder import OutputFolder
    from mergeit_hf.output.regate import regate_output
    from mergeit_hf.output.sweep import require_measured, scored_pairs

    out = OutputFolder.open(args.folder)
    alpha, min_retention = out.thresholds
    alpha = alpha if args.alpha is None else args.alpha
    min_retention = min_retention if args.min_retention is None else args.min_retention
    min_judge = out.min_judge if args.min_judge is None else args.min_judge
    MergeItConfig(alpha=alpha, min_retention=min_retention, min_judge=min_judge or 0.5)  # as a run validates
    require_measured(scored_pairs(out.pairs), args.min_judge, min_retention_given=args.min_retention is not None)
    out = regate_output(out, alpha, min_retention, min_judge)
    counts = out.record.counts
    judged = "" if min_judge is None else f", min_judge={min_judge}"
    print(
        f"re-gated {args.folder} at alpha={alpha}, min_retention={min_retention}{judged}: "
        f"{counts['merges accepted']} accepted, {counts['merges rejected']} rejected, "
        f"{counts['final rows']} final rows; no LLM request sent"
    )
    return 0


def _publish_space(args: argparse.Namespace) -> int:
    from mergeit_hf.output.space import publish_space

    if not (args.space_dir / "app.py").is_file():
        raise MergeItError(f"{args.space_dir} holds no app.py: pass the Space's folder with --space-dir")
    commit = publish_space(args.repo_id, args.space_dir, args.project, private=args.private)
    print(f"published the Space {args.repo_id}: {getattr(commit, 'commit_url', commit)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
