"""Loading a trained run: the config its weights were trained with, the model rebuilt from it, the weights checked
against their own files (manifest, ``adapter_config.json``) and loaded. Every refusal names the file at fault."""

from __future__ import annotations

import json
from pathlib import Path

from peft import PeftModel
from safetensors import SafetensorError
from torch import nn
from transformers import set_seed

from .checkpoints import WEIGHTS_CONFIG_FILE, checkpoint_problem, newest_valid_checkpoint
from .config import ConfigError, load_config
from .experiment import Experiment, RunError, build_experiment
from .full import load_weights
from .heads import MultiTaskClassifier
from .run_folder import ADAPTER_DIR

# adapter_config.json keys that say where or how the adapter was loaded, not what it is.
_NOT_COMPARED = {"base_model_name_or_path", "inference_mode", "revision", "peft_version", "auto_mapping"}


def load_run(run_dir: str | Path, checkpoint: str | None = None, untrained: bool = False) -> Experiment:
    """Rebuild a run's model from the config its final adapter (or ``checkpoint``) was trained with, and load it
    (``untrained``: keep the freshly initialised adapter, for the untrained model's baseline scores)."""
    run_dir = Path(run_dir)
    weights = Path(checkpoint) if checkpoint else run_dir / ADAPTER_DIR
    _check_weights_folder(run_dir, weights, checkpoint is not None)
    try:
        config = load_config(weights / WEIGHTS_CONFIG_FILE)
    except ConfigError as err:
        raise RunError(f"{weights / WEIGHTS_CONFIG_FILE}: {err}") from err
    set_seed(config.training_arguments().seed)  # a base built from model.config alone is then the same one
    experiment = build_experiment(config)
    if not untrained:
        load_trained(experiment.model, weights)
    experiment.model.eval()
    return experiment


def _check_weights_folder(run_dir: Path, weights: Path, named: bool) -> None:
    if not weights.is_dir():
        if named:
            raise RunError(f"checkpoint {weights} does not exist.")
        if not run_dir.is_dir():
            raise RunError(f"{run_dir} does not exist: give the folder of a run trained with `ept train`.")
        newest = newest_valid_checkpoint(run_dir)
        hint = f" (the newest valid one: --checkpoint {newest})" if newest else ""
        raise RunError(
            f"{run_dir} has no {ADAPTER_DIR}/: the run has not finished. Resume it with `ept train ... "
            f"--resume_from_checkpoint`, or evaluate a checkpoint with --checkpoint DIR{hint}."
        )
    if problem := checkpoint_problem(weights):
        raise RunError(f"{weights} is unusable: {problem}. Use another checkpoint-<step> folder, or train again.")
    if not (weights / WEIGHTS_CONFIG_FILE).is_file():
        raise RunError(
            f"{weights} has no {WEIGHTS_CONFIG_FILE} (the config its weights were trained with): it was "
            "not written by `ept train`."
        )


def load_trained(model: nn.Module, folder: Path) -> None:
    """Load adapter (and heads) weights written by ``save_pretrained`` into a model built from the same config
    (for full fine-tuning, the whole model's weights).

    A folder written for another method or base model, or whose ``adapter_config.json`` differs from the config
    (another rank, alpha, expert set...), is refused with both named: PEFT would otherwise load only the keys that
    happen to match, or fail on the first shape that does not. A truncated or corrupt weights file is named.
    """
    folder = Path(folder)
    adapted = model.encoder if isinstance(model, MultiTaskClassifier) else model
    if isinstance(adapted, PeftModel):
        _check_adapter_folder(adapted, folder)
    try:
        if isinstance(model, MultiTaskClassifier):
            model.load_trained(folder)
        else:
            load_weights(model, folder)
    except SafetensorError as err:
        raise RunError(
            f"a weights file in {folder} is truncated or corrupt ({err}); the files: "
            f"{', '.join(sorted(p.name for p in folder.glob('*.safetensors')))}. Train again, or use an "
            "intact copy."
        ) from err
    except ValueError as err:  # heads for other tasks, a full fine-tuning folder of another model
        raise RunError(str(err)) from err
    except RuntimeError as err:
        if "size mismatch" not in str(err):
            raise
        raise RunError(
            f"{folder} does not fit this run's model, so it was trained on another base model or "
            f"model.config: {str(err).strip().splitlines()[-1].strip()}"
        ) from err


def _check_adapter_folder(peft_model: PeftModel, folder: Path) -> None:
    """Refuse an adapter folder whose method, base model or settings differ from the model's, naming both."""
    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        raise RunError(f"{folder} has no adapter_config.json: it is not an adapter folder written by `ept train`.")
    try:
        saved = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise RunError(f"{config_path} is not valid JSON ({err}).") from err
    expected = peft_model.peft_config[peft_model.active_adapter]
    saved_type, expected_type = saved.get("peft_type"), getattr(expected.peft_type, "value", expected.peft_type)
    if saved_type != expected_type:
        raise RunError(
            f"{folder} holds a {saved_type} adapter, but this run's config builds {expected_type}: load "
            "it with the config of the run that trained it."
        )
    # Compare model names, not paths: the same model may live in another folder on another machine.
    saved_base, expected_base = (
        Path(name or "").name for name in (saved.get("base_model_name_or_path"), expected.base_model_name_or_path)
    )
    if saved_base != expected_base:
        raise RunError(
            f"{folder} was trained on base model {saved_base or '(built from model.config)'!r}, but "
            f"this run's model is {expected_base or '(built from model.config)'!r}."
        )
    differ = _differences(saved, expected.to_dict())
    if differ:
        raise RunError(
            f"{config_path} does not match the config these weights are loaded with: "
            f"{'; '.join(differ)}. The config is not the one the adapter was trained with."
        )


def _differences(saved: dict, expected: dict) -> list[str]:
    """``key: saved X, config Y`` for every setting that differs (sets compared as sets)."""
    differ = []
    for key in sorted(set(saved) & set(expected) - _NOT_COMPARED):
        if _comparable(saved[key], expected[key]) != _comparable(expected[key], expected[key]):
            differ.append(f"{key}: adapter {saved[key]!r}, config {_comparable(expected[key], expected[key])!r}")
    return differ


def _comparable(value, like):
    """``value`` in JSON form; sorted when the config holds a set (saved as a list in no particular order)."""
    if isinstance(like, (set, frozenset)):
        return sorted(value)
    return json.loads(json.dumps(value, default=lambda v: getattr(v, "value", str(v))))
