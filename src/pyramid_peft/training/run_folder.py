"""The run folder (``training.output_dir``): its layout, and the rule that a finished run is never changed.

A run folder holds::

    checkpoint-<step>/   the Trainer's checkpoints (adapter [+ heads], optimizer, scheduler, RNG, trainer state,
                         sampler state, the config they were trained with, a manifest)
    adapter/             the final adapter: PEFT save_pretrained (safetensors) [+ heads.safetensors], the config it
                         was trained with (experiment.yaml) and a manifest
    tensorboard/         TensorBoard logs (unless $TENSORBOARD_LOGGING_DIR names another folder)
    metrics.json         per-task metrics with split names, and the averages
    baseline-<split>.json  the untrained model's results (`ept eval RUN --baseline`): generation tasks' floors
    config.yaml          the resolved config (what ran, overrides, defaults and the data folder included); written
                         last, so its presence marks the run finished

Every path of the run folder is named here, so that later changes to how it is written happen in one place.
A finished run is a record: ``ept train`` into it is refused (:func:`claim_run_folder`) unless ``--overwrite``,
which moves the old run aside; nothing here deletes a run.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import yaml

from ..atomic import atomic_write_text
from ..data import resolve_data_dir
from ..data.declared import DeclaredDataError, resolve_task_file
from .checkpoints import STAGING_DIR, newest_valid_checkpoint
from .config import ExperimentConfig
from .experiment import RunError

CONFIG_FILE = "config.yaml"
ADAPTER_DIR = "adapter"
METRICS_FILE = "metrics.json"
EXPORT_DIR = "export"
TENSORBOARD_DIR = "tensorboard"
BASELINE_FILE = "baseline-{split}.json"
_RUN_MARKERS = (CONFIG_FILE, ADAPTER_DIR, METRICS_FILE, STAGING_DIR)


def is_finished(run_dir: Path) -> bool:
    return (run_dir / CONFIG_FILE).is_file()


def holds_a_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds any part of a run (finished, interrupted or killed while saving)."""
    return any((run_dir / name).exists() for name in _RUN_MARKERS) or any(run_dir.glob("checkpoint-*"))


def claim_run_folder(run_dir: Path, resume: bool, overwrite: bool) -> bool:
    """Check that a new ``ept train`` may write into ``run_dir``; True when a run there must first be moved aside
    (``overwrite``, see :func:`move_aside`). Only reads, so every process can check and fail alike.

    Raises :class:`RunError` naming the fixes when the folder holds a finished run (any rerun), or an unfinished
    one without ``resume`` or ``overwrite``.
    """
    if resume and overwrite:
        raise RunError(
            "--overwrite and --resume_from_checkpoint exclude each other: resume continues the run in "
            f"{run_dir}, --overwrite moves it aside to start afresh. Pass one of them."
        )
    if not run_dir.is_dir() or not holds_a_run(run_dir):
        return False
    if overwrite:
        return True
    if is_finished(run_dir):
        checkpoint = newest_valid_checkpoint(run_dir)
        further = (
            f" To train it further, start a new run from its checkpoint: --output_dir NEW "
            f"--resume_from_checkpoint {checkpoint} --max_steps MORE --allow_config_change."
            if checkpoint
            else ""
        )
        raise RunError(
            f"{run_dir} holds a finished run ({CONFIG_FILE}, {ADAPTER_DIR}/, {METRICS_FILE}), which is "
            f"kept as it is: train into a new --output_dir, or pass --overwrite to move it aside (it is "
            f"never deleted).{further}"
        )
    if not resume:
        raise RunError(
            f"{run_dir} holds an unfinished run: continue it with --resume_from_checkpoint, train into a "
            "new --output_dir, or pass --overwrite to move it aside (it is never deleted)."
        )
    return False


def move_aside(run_dir: Path) -> Path:
    """Rename ``run_dir`` to ``<run_dir>.replaced-<UTC time>`` (a new name each time); nothing is deleted."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}")
    suffix = 1
    while target.exists():
        suffix += 1
        target = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}-{suffix}")
    run_dir.rename(target)
    return target


def recorded_config(config: ExperimentConfig, run_dir: Path) -> ExperimentConfig:
    """The config as the run records it: its run folder and the data folder it reads (so that ``ept eval`` finds
    the same data with no environment set), without the one-off ``resume_from_checkpoint``."""
    training = {k: v for k, v in config.training.items() if k != "resume_from_checkpoint"}
    data_dir = resolve_data_dir(config.data.data_dir)
    data = replace(config.data, data_dir=str(data_dir.absolute()) if data_dir is not None else None)
    tasks = [_with_found_files(entry, data_dir, config.config_dir) for entry in config.tasks]
    record = replace(config, training={**training, "output_dir": str(run_dir)}, data=data, tasks=tasks)
    record.config_dir = config.config_dir
    return record


def _with_found_files(entry, data_dir: Path | None, config_dir: str | None):
    """A declared task with each data file as found (absolute), so that the run's record finds them from anywhere;
    a built-in name, a hub source and a file not found (its error comes when it is loaded) stay as written."""
    if not isinstance(entry, dict) or not isinstance(entry.get("data"), dict):
        return entry
    found = {}
    for split, source in entry["data"].items():
        try:
            found[split] = str(resolve_task_file(entry.get("name"), split, source, data_dir, config_dir))
        except (DeclaredDataError, TypeError):
            found[split] = source
    return {**entry, "data": found}


def config_text(config: ExperimentConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def write_metrics(path: str | Path, results: dict) -> None:
    """Write results as indented JSON (atomically: a reader never sees half a file)."""
    atomic_write_text(path, json.dumps(results, indent=2) + "\n")


def finish_run(run_dir: Path, config: ExperimentConfig, results: dict) -> None:
    """Write the metrics, then the config record last: from then on the folder is a finished run."""
    write_metrics(run_dir / METRICS_FILE, results)
    config.save(run_dir / CONFIG_FILE)
