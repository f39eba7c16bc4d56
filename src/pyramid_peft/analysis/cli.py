"""``ept analyze``: the analysis commands, added to the ``ept`` parser by ``pyramid_peft.cli``.

    ept analyze allocation RUN_DIR [--split eval|test] [--max-examples N] [--batch-size N] [--output DIR]
    ept analyze task-embeddings RUN_DIR [--layer NAME] [--output DIR]
    ept analyze sweep RESULTS... [--sweep SWEEP.yaml] [--output FILE.md]

Figures and tables go to ``RUN_DIR/analysis`` unless ``--output`` says otherwise.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _allocation(args) -> int:
    from .allocation import analyze_run

    _report(analyze_run(args.run_dir, args.output, args.split, args.checkpoint, args.max_examples, args.batch_size))
    return 0


def _task_embeddings(args) -> int:
    from .embeddings import analyze_run

    _report(analyze_run(args.run_dir, args.output, args.layer, args.checkpoint))
    return 0


def _sweep(args) -> int:
    from .sweeps import summarize

    table = summarize(args.results, args.sweep)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(table)
        print(f"wrote {args.output}")
    else:
        print(table, end="")
    return 0


def _report(paths: dict[str, Path]) -> None:
    for kind, path in paths.items():
        print(f"{kind:>14}  {path}")


def add_analyze_parser(subparsers) -> None:
    """Register ``ept analyze {allocation, task-embeddings, sweep}`` on the ``ept`` subcommand parsers."""
    analyze = subparsers.add_parser("analyze", help="analyse a trained run or summarize a sweep")
    commands = analyze.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")

    allocation = commands.add_parser(
        "allocation", help="per task, how often each expert is selected in every routed layer (CSV + heatmaps)"
    )
    _run_arguments(allocation)
    allocation.add_argument("--split", choices=("eval", "test"), default="eval", help="data to route (default: eval)")
    allocation.add_argument("--max-examples", type=int, help="examples per task (default: all of the split)")
    allocation.add_argument("--batch-size", type=int, help="default: the run's per_device_eval_batch_size")
    allocation.set_defaults(func=_allocation)

    embeddings = commands.add_parser(
        "task-embeddings", help="PCA scatter and cosine similarity of the learned task embeddings"
    )
    _run_arguments(embeddings)
    embeddings.add_argument("--layer", help="one adapted module (full name or its end); default: all, averaged")
    embeddings.set_defaults(func=_task_embeddings)

    sweep = commands.add_parser("sweep", help="summarize a sweep's result JSONs as a Markdown table (paper layout)")
    sweep.add_argument("results", nargs="+", help="result JSON files, or folders searched for *.json")
    sweep.add_argument("--sweep", help="the sweep file: row order, label columns and task columns of its table")
    sweep.add_argument("--output", help="write the Markdown here instead of printing it")
    sweep.set_defaults(func=_sweep)


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run folder written by `ept train`")
    parser.add_argument("--checkpoint", help="a checkpoint-<step> folder instead of the final adapter")
    parser.add_argument("--output", help="output folder (default: RUN_DIR/analysis)")
