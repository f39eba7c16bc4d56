"""The ``ept`` command line: train, eval, export, params (and ``analyze`` when that module is installed).

    ept train CONFIG [--max_steps 20 --output_dir X --method.r 4 ...]
    ept eval RUN_DIR [--split test] [--checkpoint RUN_DIR/checkpoint-100] [--output FILE.json]
    ept export RUN_DIR --task NAME (--merged | --lora) [--output DIR]
    ept params CONFIG [overrides]

Also runs as ``python -m pyramid_peft.cli``, e.g. under ``accelerate launch -m pyramid_peft.cli train ...``.
Every subcommand sets ``func`` (a callable taking the parsed arguments and returning an exit code); a module
``pyramid_peft.analysis.cli`` may add the ``analyze`` group through ``add_analyze_parser(subparsers)``.
"""

from __future__ import annotations

import argparse
import json
import sys


def _train(args) -> int:
    from .training import load_config, train
    from .training.evaluate import metrics_table

    results = train(load_config(args.config, args.overrides))
    if _is_main_process():
        print(metrics_table(results))
    return 0


def _eval(args) -> int:
    from .training import evaluate_run
    from .training.evaluate import metrics_table
    from .training.run import write_metrics

    results = evaluate_run(args.run_dir, split=args.split, checkpoint=args.checkpoint)
    print(metrics_table(results))
    if args.output:
        write_metrics(args.output, results)
    return 0


def _export(args) -> int:
    from .training import export_run

    out = export_run(args.run_dir, args.task, "merged" if args.merged else "lora", args.output)
    print(f"exported {args.task} ({'merged model' if args.merged else 'LoRA adapter'}) to {out}")
    return 0


def _params(args) -> int:
    from .training import count_config_parameters, load_config

    counts = count_config_parameters(load_config(args.config, args.overrides))
    width = max(len(k) for k in counts)
    for key, value in counts.items():
        shown = f"{value:,.0f}" if isinstance(value, (int, float)) else json.dumps(value)
        print(f"{key.ljust(width)}  {shown}")
    return 0


def _is_main_process() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ept", description="Multi-task parameter-efficient fine-tuning.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train from a YAML config; extra --key value pairs override it")
    train.add_argument("config", help="YAML config file")
    train.add_argument("overrides", nargs=argparse.REMAINDER, help="e.g. --max_steps 20 --method.r 4")
    train.set_defaults(func=_train)

    evaluate = commands.add_parser("eval", help="evaluate a finished run on its evaluation (or test) split")
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--split", choices=("eval", "test"), default="eval")
    evaluate.add_argument("--checkpoint", help="a checkpoint-<step> folder instead of the final adapter")
    evaluate.add_argument("--output", help="also write the results to this JSON file")
    evaluate.set_defaults(func=_eval)

    export = commands.add_parser("export", help="export one task's adapter as stock LoRA or a merged model")
    export.add_argument("run_dir")
    export.add_argument("--task", required=True)
    kind = export.add_mutually_exclusive_group(required=True)
    kind.add_argument("--lora", action="store_true", help="a PEFT LoRA adapter folder (loads in stock PEFT)")
    kind.add_argument("--merged", action="store_true", help="the base model with the task's weights merged in")
    export.add_argument("--output", help="output folder (default: RUN_DIR/export/<task>-<kind>)")
    export.set_defaults(func=_export)

    params = commands.add_parser("params", help="count the adapter parameters of a config's model and method")
    params.add_argument("config")
    params.add_argument("overrides", nargs=argparse.REMAINDER)
    params.set_defaults(func=_params)

    _add_optional_commands(commands)
    return parser


def _add_optional_commands(commands) -> None:
    """Let ``pyramid_peft.analysis.cli`` add the ``analyze`` group, when that module exists."""
    try:
        from .analysis.cli import add_analyze_parser
    except ModuleNotFoundError as err:
        if err.name not in ("pyramid_peft.analysis", "pyramid_peft.analysis.cli"):
            raise  # the module exists but one of its imports is missing: that is a real error
        return
    add_analyze_parser(commands)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as err:  # a wrong config, path or name: the message says what to fix
        parser.exit(2, f"ept {args.command}: error: {err}\n")


def _user_errors() -> tuple[type[Exception], ...]:
    from .data import DataSourceError
    from .models import ModelNotAvailableError
    from .tasks import UnknownTaskError
    from .training import ConfigError

    return ConfigError, DataSourceError, ModelNotAvailableError, UnknownTaskError, FileNotFoundError


if __name__ == "__main__":
    sys.exit(main())
