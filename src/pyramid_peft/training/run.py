"""Runs: train a config into its run folder, and evaluate a finished run.

The pieces live beside this module: :mod:`.validation` (the whole config checked first), :mod:`.experiment`
(model, method and data from a config), :mod:`.run_folder` (the folder's layout and its rule: a finished run is
never changed), :mod:`.loading` (a trained run rebuilt and checked), :mod:`.export` and :mod:`.trainer`.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import TrainerCallback, set_seed
from transformers.integrations import TensorBoardCallback

from .checkpoints import WEIGHTS_CONFIG_FILE
from .config import ConfigError, ExperimentConfig
from .evaluate import Predictor, evaluate_tasks, with_baseline_floors
from .experiment import build_experiment, collators, evaluation_setup, load_splits
from .loading import load_run
from .run_folder import (
    ADAPTER_DIR,
    BASELINE_FILE,
    TENSORBOARD_DIR,
    claim_run_folder,
    config_text,
    finish_run,
    move_aside,
    recorded_config,
    write_metrics,
)
from .trainer import MultiTaskDataset, MultiTaskTrainer
from .validation import check_config


def build_trainer(config: ExperimentConfig, callbacks: Sequence[TrainerCallback] = ()) -> MultiTaskTrainer:
    """The model, data and :class:`MultiTaskTrainer` of a config (plus extra Trainer ``callbacks``), ready to
    ``train()``."""
    check_config(config, for_training=True)
    args = config.training_arguments(**_training_defaults(config))
    return _trainer(config, args, recorded_config(config, Path(args.output_dir)), callbacks)


def _trainer(
    config: ExperimentConfig,
    args,
    record: ExperimentConfig,
    callbacks: Sequence[TrainerCallback],
    allow_config_change: bool = False,
) -> MultiTaskTrainer:
    """The trainer of a checked ``config`` with its built training arguments and its run-folder ``record``."""
    _check_processes(args)
    set_seed(args.seed)
    experiment = build_experiment(record)
    splits = load_splits(experiment)
    train_collator, _ = collators(experiment)
    trainer = MultiTaskTrainer(
        model=experiment.model,
        args=args,
        train_dataset=MultiTaskDataset(
            config.task_names, [s.train for s in splits], [t.weight for t in experiment.tasks]
        ),
        data_collator=train_collator,
        processing_class=experiment.tokenizer,
        eval_setup=evaluation_setup(experiment, splits),
        sampling=config.sampling,
        head_learning_rate=config.model.head_learning_rate,
        extra_files={WEIGHTS_CONFIG_FILE: config_text(record)},
        config_record=record.to_dict(),
        allow_config_change=allow_config_change,
        callbacks=list(callbacks),
    )
    _log_to_the_run_folder(trainer, Path(args.output_dir))
    return trainer


def train(
    config: ExperimentConfig,
    overwrite: bool = False,
    callbacks: Sequence[TrainerCallback] = (),
    allow_config_change: bool = False,
    checked: bool = False,
) -> dict:
    """Check the config and the run folder, train, evaluate and fill the run folder; returns the final results.
    ``callbacks`` are extra Trainer callbacks (a benchmark recording each evaluation as it happens).

    A folder that holds a run is refused (see :func:`.run_folder.claim_run_folder`) unless this resumes an
    unfinished one, or ``overwrite`` moves the old run aside first. Resuming refuses a checkpoint trained under
    settings that change the trajectory (see :mod:`.checkpoints`) unless ``allow_config_change``. ``checked``: the
    config was already validated for training (``load_config(..., for_training=True)`` does), so it is not again.
    """
    if not checked:
        check_config(config, for_training=True)
    args = config.training_arguments(**_training_defaults(config))
    run_dir = Path(args.output_dir)
    must_move = claim_run_folder(run_dir, bool(args.resume_from_checkpoint), overwrite)  # every process alike
    with args.main_process_first(local=False, desc="moving the earlier run aside"):
        if must_move and args.should_save and run_dir.is_dir():
            print(f"ept: moved the run that was in {run_dir} to {move_aside(run_dir)}", file=sys.stderr)
    record = recorded_config(config, run_dir)
    trainer = _trainer(config, args, record, callbacks, allow_config_change)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint or None)
    trainer.evaluate()
    results = {
        "model": config.model.name,
        "method": config.method.name,
        "step": trainer.state.global_step,
        **trainer.last_eval_results,
    }
    trainer.save_model_atomically(run_dir / ADAPTER_DIR)  # on every rank: FSDP and DeepSpeed gather the weights
    if trainer.is_world_process_zero():
        finish_run(run_dir, record, results)
    return results


def _log_to_the_run_folder(trainer: MultiTaskTrainer, run_dir: Path) -> None:
    """TensorBoard writes to ``RUN/tensorboard`` (one folder, appended to on resume) unless
    ``$TENSORBOARD_LOGGING_DIR`` chose another; the stock default nests a dated ``runs/`` folder in the run."""
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
            callback.logging_dir = str(run_dir / TENSORBOARD_DIR)


def _training_defaults(config: ExperimentConfig) -> dict:
    """Defaults that depend on the experiment and the machine: the run folder, DDP's unused-parameter search, and
    the CPU where there is no accelerator.

    Top-k routing leaves some experts without gradient in a step, and a heads model uses one head per batch:
    DDP must then look for unused parameters or it waits forever for their gradients. Without ``use_cpu`` the
    Trainer does not join a multi-process CPU launch (DDP over gloo): each process would train alone.
    """
    model = config.model.name or config.model.config.get("model_type", "model")
    return {
        "output_dir": f"runs/{config.method.name}-{model.rstrip('/').rsplit('/', 1)[-1]}",
        "ddp_find_unused_parameters": True,
        "use_cpu": not _has_accelerator(),
    }


def _has_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6 knows every backend, not only CUDA
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def _check_processes(args) -> None:
    """Refuse a launch of several processes that the Trainer would run as independent single-process runs."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and args.world_size == 1:
        raise ConfigError(
            f"{launched} processes were launched but the Trainer runs each alone: they would train the same run "
            "side by side and overwrite each other's checkpoints. On a machine without a GPU, pass --use_cpu true."
        )


def evaluate_run(
    run_dir: str | Path, split: str = "eval", checkpoint: str | None = None, baseline: bool = False
) -> dict:
    """Per-task results of a finished run (final adapter, or ``checkpoint``) on its ``eval`` or ``test`` split.

    ``baseline``: the untrained model instead (the run's base with its adapter as initialised, the same seed), whose
    scores are the generation tasks' floors; they are written to ``RUN/baseline-<split>.json``, and later
    evaluations of the run read them from there.
    """
    experiment = load_run(run_dir, checkpoint, untrained=baseline)
    setup = evaluation_setup(experiment, load_splits(experiment), use_test=split == "test")
    predictor = Predictor.for_run(experiment.model, setup, experiment.config.training_arguments())
    results = evaluate_tasks(predictor, setup.sets)
    baseline_file = Path(run_dir) / BASELINE_FILE.format(split=split)
    if baseline:
        results = {**results, "weights": "untrained (adapter as initialised)"}
        write_metrics(baseline_file, {"model": experiment.config.model.name, **results})
    elif baseline_file.is_file():
        results = with_baseline_floors(results, json.loads(baseline_file.read_text()))
    return {
        "model": experiment.config.model.name,
        "method": experiment.config.method.name,
        "weights": str(checkpoint or Path(run_dir) / ADAPTER_DIR),
        **results,
    }
