"""Checkpoints that are complete or absent, and resuming from the newest good one.

A checkpoint ``checkpoint-<step>`` is written under a temporary name (``.partial/checkpoint-<step>``, which the
Trainer's checkpoint search does not look into) and renamed once complete, so a run killed while saving leaves no
folder under a checkpoint name. The last file written before the rename is ``checkpoint_manifest.json``, the size
and SHA-256 of every other file: a folder without one, or whose files differ from it (truncated, edited, a bad
disk), is not a valid checkpoint, and resuming skips it for the newest valid one before it, with a warning.

Every checkpoint also records the config its weights were trained under (``experiment.yaml``). Resuming compares
it with the run's config and refuses a difference that changes what is trained (steps, schedule, learning rate,
method settings, tasks, data and sampling), naming each setting; where the run and its data live, logging, and the
evaluation and saving cadence may change (:data:`FREE_ON_RESUME`). ``allow_config_change`` (``ept train
--allow_config_change``) resumes anyway, for a run extended on purpose.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import re
import sys
import warnings
from pathlib import Path

import torch
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .config import read_yaml

MANIFEST_FILE = "checkpoint_manifest.json"
WEIGHTS_CONFIG_FILE = "experiment.yaml"  # inside adapter/ and every checkpoint: the config those weights came from
SAMPLER_STATE_FILE = "sampler_state.json"
STAGING_DIR = ".partial"
_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
_HASH_CHUNK = 1 << 20


class CheckpointError(RuntimeError):
    """There is no checkpoint to resume from, or none of the candidates is complete and intact."""


class CheckpointWarning(UserWarning):
    """A partial or corrupt checkpoint was skipped in favour of an older, valid one."""


class ConfigChangedError(CheckpointError):
    """The checkpoint to resume from was trained under settings that the run's config changes."""


# Where a run and its data live: never what it trained on.
LOCATIONS = ("training.output_dir", "data.data_dir")
# Dotted settings (fnmatch patterns) that a resumed run may change: where it lives, what it logs, and when it
# evaluates and saves. Everything else shapes the trajectory (a changed max_steps or learning rate would splice
# two schedules) or what the weights are.
FREE_ON_RESUME = (
    *LOCATIONS,
    "training.resume_from_checkpoint",
    "training.overwrite_output_dir",
    "training.logging_*",
    "training.log_*",
    "training.report_to",
    "training.run_name",
    "training.disable_tqdm",
    "training.eval_*",
    "training.per_device_eval_batch_size",
    "training.save_*",
    "training.load_best_model_at_end",
    "training.metric_for_best_model",
    "training.greater_is_better",
    "training.generation_num_beams",
    "data.max_eval_examples",
    "data.answer_scoring",
)


def dotted_settings(config: dict, prefix: str = "") -> dict:
    """A nested config dict as ``{"section.key": value}``."""
    settings = {}
    for name, value in config.items():
        if isinstance(value, dict):
            settings.update(dotted_settings(value, f"{prefix}{name}."))
        else:
            settings[f"{prefix}{name}"] = value
    return settings


def config_differences(saved: dict, current: dict, ignored: tuple[str, ...] = LOCATIONS) -> list[str]:
    """``key: was X, now Y`` for every setting of two config dicts (nested keys dotted) that differs, except those
    matching a pattern of ``ignored``."""
    was, now = dotted_settings(saved), dotted_settings(current)
    keys = [key for key in sorted(set(was) | set(now)) if not any(fnmatch.fnmatch(key, p) for p in ignored)]
    return [
        f"{key}: was {was.get(key, '(unset)')!r}, now {now.get(key, '(unset)')!r}"
        for key in keys
        if json.dumps(was.get(key), default=str) != json.dumps(now.get(key), default=str)
    ]


def resume_differences(checkpoint: str | Path, current: dict) -> list[str]:
    """The settings of ``current`` (a config dict as the run records it) that change what the weights in
    ``checkpoint`` were trained under; a checkpoint without a record (written by another tool) has none to check."""
    record = Path(checkpoint) / WEIGHTS_CONFIG_FILE
    if not record.is_file():
        return []
    return config_differences(read_yaml(record.read_text()) or {}, current, FREE_ON_RESUME)


def check_resume_config(checkpoint: str | Path, current: dict, allow_change: bool = False) -> None:
    """Refuse to resume ``checkpoint`` under a config whose trajectory differs from the one it recorded, naming
    each setting; with ``allow_change``, say what changed and go on."""
    differ = resume_differences(checkpoint, current)
    if not differ:
        return
    listed = "; ".join(differ)
    if allow_change:
        print(f"ept: resuming {checkpoint} under a changed config (--allow_config_change): {listed}", file=sys.stderr)
        return
    raise ConfigChangedError(
        f"{checkpoint} was trained under another config: {listed}. Resuming would splice two runs. Restore those "
        "settings, or pass --allow_config_change to extend the run on purpose (e.g. a larger max_steps)."
    )


def staging_folder(checkpoint: Path) -> Path:
    """Where ``checkpoint`` is written before it is renamed into place (the same path on every process)."""
    return checkpoint.parent / STAGING_DIR / checkpoint.name


def write_manifest(folder: Path, step: int) -> None:
    """Record the size and SHA-256 of every file in ``folder``; written last, it marks the folder complete."""
    files = {
        path.relative_to(folder).as_posix(): _fingerprint(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST_FILE
    }
    (folder / MANIFEST_FILE).write_text(json.dumps({"step": step, "files": files}, indent=1))


def checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a usable checkpoint, or None when every file matches its manifest."""
    try:
        files = json.loads((folder / MANIFEST_FILE).read_text())["files"]
    except FileNotFoundError:
        return f"it has no {MANIFEST_FILE}, so its save never finished"
    except (ValueError, KeyError, TypeError) as err:
        return f"its {MANIFEST_FILE} is unreadable ({err})"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        actual = _fingerprint(path)
        if actual["size"] != expected["size"]:
            return f"{name} has {actual['size']} bytes instead of {expected['size']} (truncated or overwritten)"
        if actual != expected:
            return f"{name} does not match its SHA-256 in {MANIFEST_FILE} (corrupt)"
    return None


def newest_valid_checkpoint(run_dir: str | Path) -> Path | None:
    """The valid checkpoint of ``run_dir`` with the highest step, or None."""
    return next((path for path in _newest_first(Path(run_dir)) if checkpoint_problem(path) is None), None)


def newest_sound_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest valid checkpoint whose weights are all finite and whose logged training losses were all finite:
    one that a resume at a saner learning rate can start from. Each candidate is read before it is named."""
    return next(
        (
            path
            for path in _newest_first(Path(run_dir))
            if checkpoint_problem(path) is None and _finite_weights(path) and _finite_losses(path)
        ),
        None,
    )


def _finite_weights(folder: Path) -> bool:
    from safetensors import safe_open

    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as weights:
            if not all(torch.isfinite(weights.get_tensor(key)).all() for key in weights.keys()):  # noqa: SIM118 (a safe_open handle, not a dict)
                return False
    return True


def _finite_losses(folder: Path) -> bool:
    state = json.loads((folder / TRAINER_STATE_NAME).read_text()) if (folder / TRAINER_STATE_NAME).is_file() else {}
    return all(math.isfinite(entry["loss"]) for entry in state.get("log_history", []) if "loss" in entry)


def resolve_resume(request: str | bool | None, run_dir: str | Path) -> str | None:
    """The checkpoint to resume from for ``resume_from_checkpoint=request``.

    ``True`` means the newest checkpoint in ``run_dir``; a path means that checkpoint. A partial or corrupt one is
    skipped (with a :class:`CheckpointWarning`) for the newest valid checkpoint before it in the same folder.
    Raises :class:`CheckpointError` when there is nothing valid to resume from.
    """
    if request is None or request is False:
        return None
    if request is True:
        candidates = _newest_first(Path(run_dir))
        if not candidates:
            raise CheckpointError(
                f"resume_from_checkpoint is set but {run_dir} holds no checkpoint-<step> folder: train without "
                "--resume_from_checkpoint, or set --output_dir to the folder of the run to resume."
            )
    else:
        named = Path(request)
        if not named.is_dir():
            raise CheckpointError(f"resume_from_checkpoint={request}: no such folder.")
        step = _step(named)
        older = [path for path in _newest_first(named.parent) if step is not None and _step(path) < step]
        candidates = [named, *older]
    skipped = []
    for candidate in candidates:
        problem = checkpoint_problem(candidate)
        if problem is None:
            for path, why in skipped:
                warnings.warn(
                    f"checkpoint {path} is unusable: {why}. Resuming from {candidate} instead.",
                    CheckpointWarning,
                    stacklevel=2,
                )
            return str(candidate)
        skipped.append((candidate, problem))
    reasons = "; ".join(f"{path}: {why}" for path, why in skipped)
    raise CheckpointError(
        f"no valid checkpoint to resume from ({reasons}). Train again without --resume_from_checkpoint."
    )


def _newest_first(run_dir: Path) -> list[Path]:
    if not run_dir.is_dir():
        return []
    found = [path for path in run_dir.iterdir() if path.is_dir() and _step(path) is not None]
    return sorted(found, key=_step, reverse=True)


def _step(path: Path) -> int | None:
    match = _CHECKPOINT_NAME.match(path.name)
    return int(match[1]) if match else None


def _fingerprint(path: Path) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}
