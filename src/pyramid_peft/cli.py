"""The ``ept`` command line: train, eval, export, params (and ``analyze`` when that module is installed).

    ept train CONFIG [--max_steps 20 --output_dir X --method.r 4 ...] [--resume_from_checkpoint [DIR]]
              [--allow_config_change] [--overwrite]
    ept eval RUN_DIR [--split test] [--checkpoint RUN_DIR/checkpoint-100] [--output FILE.json] [--baseline]
    ept export RUN_DIR --task NAME (--merged | --lora) [--output DIR]
    ept params CONFIG [overrides]
    ept convert SRC OUT --from ept-code|tucka-code [--base MODEL --top_k 2 --num_tasks 8 --gate code]

Also runs as ``python -m pyramid_peft.cli``, e.g. under ``accelerate launch -m pyramid_peft.cli train ...``.
Every subcommand sets ``func`` (a callable taking the parsed arguments and returning an exit code); a module
``pyramid_peft.analysis.cli`` may add the ``analyze`` group through ``add_analyze_parser(subparsers)``.

``--resume_from_checkpoint`` alone resumes from the newest valid checkpoint of the output folder (a partial or
corrupt one is skipped with a warning); with a folder, from that checkpoint. A checkpoint trained under settings
that change the trajectory (steps, schedule, learning rate, method, tasks, data, sampling) is refused, naming them;
``--allow_config_change`` resumes it anyway (a run extended on purpose). ``--overwrite`` moves a run already
in the output folder aside (never deletes it); without it ``ept train`` refuses a folder that holds a run. SIGTERM
or Ctrl-C during ``ept train`` saves a checkpoint, prints how to resume, and exits with 128 + the signal number.

A user error (a bad config, path, name or file) is printed as a short message and exits with 2; ``--debug`` (or
``EPT_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys

DEBUG_ENV = "EPT_DEBUG"


def _train(args) -> int:
    from .training import load_config, train
    from .training.evaluate import metrics_table
    from .training.guards import TrainingInterrupted

    overrides, overwrite = _take_flag(args.overrides, "--overwrite")
    overrides, allow_change = _take_flag(overrides, "--allow_config_change")
    try:
        config = load_config(args.config, overrides, for_training=True)  # checked here, once
        results = train(config, overwrite=overwrite, allow_config_change=allow_change, checked=True)
    except TrainingInterrupted as stop:  # its checkpoint is saved: exit as the signal would, saying how to resume
        print(f"ept train: {stop}", file=sys.stderr)
        return 128 + stop.signum
    if _is_main_process():
        print(metrics_table(results))
    return 0


def _eval(args) -> int:
    from .training import evaluate_run
    from .training.evaluate import metrics_table
    from .training.run_folder import write_metrics

    results = evaluate_run(args.run_dir, split=args.split, checkpoint=args.checkpoint, baseline=args.baseline)
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
    from .analysis.params import params_command

    print(params_command(args.config, args.overrides), end="")
    return 0


def _convert(args) -> int:
    from .convert import ConversionError, convert_reference
    from .models import load_model, resolve_model

    base = None
    if args.base:
        import torch

        with torch.device("meta"):  # shapes only: the check needs no weights
            base = load_model(resolve_model(args.base), random_init=True)
    try:
        out = convert_reference(
            args.src,
            args.out,
            source=args.source,
            base_model=base,
            top_k=args.top_k,
            num_tasks=args.num_tasks,
            gate=args.gate,
        )
    except ConversionError as err:
        print(f"ept convert: error: {err}", file=sys.stderr)
        return 2
    print(f"converted {args.src} ({args.source}) to {out}: load it with PeftModel.from_pretrained(base, {str(out)!r})")
    return 0


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _take_flag(overrides: list[str], flag: str) -> tuple[list[str], bool]:
    """``overrides`` without ``flag``, and whether it was there (a flag of ``ept`` itself, not a config key)."""
    return [token for token in overrides if token != flag], flag in overrides


def build_parser() -> argparse.ArgumentParser:
    from .convert import converter_sources

    parser = argparse.ArgumentParser(prog="ept", description="Multi-task parameter-efficient fine-tuning.")
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"show the traceback of an error (also: {DEBUG_ENV}=1; may also follow the command)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train from a YAML config; extra --key value pairs override it")
    train.add_argument("config", help="YAML config file")
    train.add_argument(
        "overrides",
        nargs=argparse.REMAINDER,
        help="e.g. --max_steps 20 --method.r 4; --resume_from_checkpoint [DIR] resumes an interrupted "
        "run (default: the newest valid checkpoint in output_dir), refusing one trained under settings that "
        "change the trajectory unless --allow_config_change; --overwrite moves a run already in output_dir aside",
    )
    train.set_defaults(func=_train)

    evaluate = commands.add_parser("eval", help="evaluate a finished run on its evaluation (or test) split")
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--split", choices=("eval", "test"), default="eval")
    evaluate.add_argument("--checkpoint", help="a checkpoint-<step> folder instead of the final adapter")
    evaluate.add_argument("--output", help="also write the results to this JSON file")
    evaluate.add_argument(
        "--baseline",
        action="store_true",
        help="score the untrained model (adapter as initialised) instead: the generation tasks' floors, kept in "
        "RUN/baseline-<split>.json for later evaluations of the run",
    )
    evaluate.set_defaults(func=_eval)

    export = commands.add_parser("export", help="export one task's adapter as stock LoRA or a merged model")
    export.add_argument("run_dir")
    export.add_argument("--task", required=True)
    kind = export.add_mutually_exclusive_group(required=True)
    kind.add_argument("--lora", action="store_true", help="a PEFT LoRA adapter folder (loads in stock PEFT)")
    kind.add_argument("--merged", action="store_true", help="the base model with the task's weights merged in")
    export.add_argument("--output", help="output folder (default: RUN_DIR/export/<task>-<kind>)")
    export.set_defaults(func=_export)

    params = commands.add_parser(
        "params", help="the Appendix-C parameter table of a config's model and method (weights are never loaded)"
    )
    params.add_argument("config", help="a YAML config, or a model name such as t5-base or meta-llama/Llama-2-7b-hf")
    params.add_argument(
        "overrides",
        nargs=argparse.REMAINDER,
        help="config overrides; '--methods NAME... | all' tabulates other methods on the same model",
    )
    params.set_defaults(func=_params)

    convert = commands.add_parser("convert", help="import an adapter trained with the public EPT or TuckA code")
    convert.add_argument("src", help="the public code's save_pretrained folder")
    convert.add_argument("out", help="the pyramid-peft adapter folder to write")
    convert.add_argument("--from", dest="source", required=True, choices=converter_sources())
    convert.add_argument("--base", help="the base model (hub id, path or alias) to check the module shapes against")
    convert.add_argument("--top_k", type=int, help="EPT experts per task (default 2, as the public code)")
    convert.add_argument("--num_tasks", type=int, help="task ids (default: the rows of the task table)")
    convert.add_argument("--gate", choices=("code", "paper"), help="EPT gate form (default code)")
    convert.set_defaults(func=_convert)

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
    # --debug may stand anywhere (before the command, or among a command's arguments and overrides).
    argv, debug_flag = _take_flag(list(sys.argv[1:] if argv is None else argv), "--debug")
    args = parser.parse_args(argv)
    debug = debug_flag or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        return args.func(args)
    except _user_errors() as err:  # a wrong config, path, name or file: the message says what to fix
        if debug:
            raise
        parser.exit(2, f"ept {args.command}: error: {err}\n")


def _user_errors() -> tuple[type[Exception], ...]:
    from . import NotMergeableError, TaskRoutingError
    from .data import DataSourceError
    from .models import ModelNotAvailableError, ModelSpecError
    from .tasks import UnknownTaskError
    from .training import ConfigError, RunError
    from .training.checkpoints import CheckpointError
    from .training.guards import NonFiniteLossError

    # OSError covers missing files and models that are neither a local folder nor reachable on the hub.
    return (
        ConfigError,
        DataSourceError,
        ModelNotAvailableError,
        ModelSpecError,
        RunError,
        UnknownTaskError,
        OSError,
        CheckpointError,
        NonFiniteLossError,
        NotMergeableError,
        TaskRoutingError,
    )


if __name__ == "__main__":
    sys.exit(main())
