"""Runs: build a model and data from a config, train, evaluate, export, and keep the run folder.

A run folder (``training.output_dir``) holds::

    config.yaml          the resolved config (what ran, overrides included)
    checkpoint-<step>/   the Trainer's checkpoints (adapter [+ heads], optimizer, scheduler, RNG, trainer state)
    adapter/             the final adapter: PEFT save_pretrained (safetensors) [+ heads.safetensors]
    runs/                TensorBoard logs
    metrics.json         per-task metrics with split names, and the averages

Every path of the run folder is named here, so that later changes to how it is written happen in one place.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from torch import nn
from transformers import set_seed

from .. import export_lora, make_peft_config, merge_for_task, uses_task_ids
from ..atomic import atomic_write_text
from ..data import CausalLMCollator, ClassificationCollator, TextToTextCollator, build_splits
from ..models import ResolvedModel, load_model, load_tokenizer, resolve_model
from ..registry import METHODS
from ..tasks import TaskSpec, get_task
from .checkpoints import checkpoint_problem
from .config import ConfigError, ExperimentConfig, load_config
from .evaluate import EvalSet, Predictor, answer_token_budget, evaluate_tasks
from .full import check_full_options, is_full, load_weights
from .heads import MultiTaskClassifier, needs_task_ids
from .model_card import write_model_card
from .trainer import EvalSetup, MultiTaskDataset, MultiTaskTrainer

CONFIG_FILE = "config.yaml"
ADAPTER_DIR = "adapter"
METRICS_FILE = "metrics.json"
EXPORT_DIR = "export"
class RunError(ValueError):
    """A run folder cannot do what was asked (a task it did not train, a split its protocol lacks)."""


_TASK_TYPES = {"seq2seq": "SEQ_2_SEQ_LM", "causal": "CAUSAL_LM", "encoder": None}


@dataclass
class Experiment:
    """A config made concrete: the resolved model, its tokenizer, the tasks and the adapted model."""

    config: ExperimentConfig
    resolved: ResolvedModel
    tokenizer: object
    tasks: list[TaskSpec]
    model: nn.Module  # a MultiTaskClassifier (encoder family) or a PeftModel (the bare model for `full`)

    @property
    def family(self) -> str:
        return self.resolved.family

    @property
    def full(self) -> bool:
        """Full fine-tuning: no adapter, every weight trains."""
        return is_full(self.config.method.name)

    @property
    def peft_model(self) -> PeftModel:
        """The adapted model inside the heads (for full fine-tuning, the bare model)."""
        return self.model.encoder if isinstance(self.model, MultiTaskClassifier) else self.model


# -- building -------------------------------------------------------------------------------------------------
def build_experiment(config: ExperimentConfig, random_init: bool = False) -> Experiment:
    """Resolve the model, load it (or build it with random weights) and wrap it with the config's method."""
    if not config.tasks:
        raise ConfigError("the config lists no tasks: add e.g. tasks: [rte, sst2].")
    tasks = [get_task(name) for name in config.tasks]
    section = config.model
    resolved = resolve_model(section.name, section.tokenizer, section.config, section.family, section.trust_remote_code)
    tokenizer = load_tokenizer(resolved)
    base = load_model(resolved, section.dtype, random_init=random_init)
    if is_full(config.method.name):
        try:
            check_full_options(config.method.options)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        adapted = base  # every weight trains
    else:
        adapted = _adapt(base, peft_config(config, resolved.family, len(tasks)), config.method.name)
    model = adapted
    if resolved.family == "encoder":
        model = MultiTaskClassifier(
            adapted,
            [t.name for t in tasks],
            [t.num_labels for t in tasks],
            hidden_size=base.config.hidden_size,
            route_task_ids=uses_task_ids(adapted),
            **_head_dropout(base.config),
        )
    return Experiment(config, resolved, tokenizer, tasks, model)


def _adapt(base: nn.Module, method_config, method: str) -> PeftModel:
    """``get_peft_model``, with its complaints about the config (targets, ranks) raised as :class:`ConfigError`."""
    try:
        return get_peft_model(base, method_config)
    except ValueError as err:
        linears = sorted({name.rsplit(".", 1)[-1] for name, m in base.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(f"method {method!r} cannot adapt this model: {err} (Its linear layers are named: "
                          f"{', '.join(linears)}; method.target_modules picks among them.)") from err


def _head_dropout(model_config) -> dict:
    """The heads' ``dropout`` as transformers' sequence classifiers read it from the model config, if it has one."""
    for key in ("classifier_dropout", "hidden_dropout_prob"):
        if getattr(model_config, key, None) is not None:
            return {"dropout": getattr(model_config, key)}
    return {}


def peft_config(config: ExperimentConfig, family: str, num_tasks: int):
    """The method's PEFT config, with the task count and PEFT task type filled in from the experiment."""
    method = config.method
    options = dict(method.options)
    valid = _method_fields(method.name)
    for key in options:
        if key not in valid:
            hint = difflib.get_close_matches(key, valid, n=1)
            extra = f" Did you mean 'method.{hint[0]}'?" if hint else ""
            raise ConfigError(f"unknown key 'method.{key}' for method {method.name!r}.{extra}")
    if "num_tasks" in valid:
        options.setdefault("num_tasks", num_tasks)
        if isinstance(options["num_tasks"], int) and options["num_tasks"] < num_tasks:
            raise ConfigError(
                f"method.num_tasks={options['num_tasks']} is smaller than the {num_tasks} tasks configured "
                f"{config.tasks}, whose ids run up to {num_tasks - 1}: remove method.num_tasks (it defaults to the "
                f"number of tasks) or set it to at least {num_tasks}."
            )
    if _TASK_TYPES[family] is not None:
        options.setdefault("task_type", _TASK_TYPES[family])
    try:
        return make_peft_config(method.name, **options)
    except ValueError as err:  # a value out of range: the method's message names it and the fix
        raise ConfigError(f"method {method.name!r}: {err}") from err


def _method_fields(name: str) -> list[str]:
    """Keyword arguments the method's config class accepts (an unknown method is reported by the registry)."""
    key = name.lower()
    if key != "lora" and key not in METHODS:
        try:
            make_peft_config(name)
        except ValueError as err:  # the registry's message lists the methods and the closest name
            raise ConfigError(f"method.name: {err}") from None
    cls = LoraConfig if key == "lora" else METHODS[key][0]
    return [f.name for f in fields(cls) if f.init]


def collators(experiment: Experiment) -> tuple[object, object]:
    """(training collator, evaluation collator) for the model family."""
    data, tokenizer = experiment.config.data, experiment.tokenizer
    if experiment.family == "encoder":
        collator = ClassificationCollator(tokenizer, max_length=data.max_source_length)
        return collator, collator
    if experiment.family == "causal":
        return (
            CausalLMCollator(tokenizer, max_length=data.max_source_length),
            CausalLMCollator(tokenizer, max_length=data.max_source_length, for_generation=True),
        )
    target_length = data.max_target_length or max(
        answer_token_budget(t, tokenizer, experiment.family) for t in experiment.tasks
    )
    collator = TextToTextCollator(tokenizer, data.max_source_length, target_length)
    return collator, collator


def load_splits(experiment: Experiment) -> list:
    """Each task's :class:`pyramid_peft.data.TaskSplits` under the config's protocol."""
    data = experiment.config.data
    return [
        build_splits(t.name, data.protocol, data.data_dir, max_eval=data.max_eval_examples) for t in experiment.tasks
    ]


def eval_sets(experiment: Experiment, splits: list, use_test: bool = False) -> list[EvalSet]:
    """Per-task evaluation sets (the test split with ``use_test``, where the protocol has one)."""
    sets = []
    for task_id, (task, split) in enumerate(zip(experiment.tasks, splits)):
        if use_test and split.test is None:
            raise RunError(f"protocol {experiment.config.data.protocol!r} has no test split for {task.name}.")
        examples, name = (split.test, split.test_split) if use_test else (split.eval, split.eval_split)
        sets.append(EvalSet(task, task_id, examples, name))
    return sets


# -- training -------------------------------------------------------------------------------------------------
def build_trainer(config: ExperimentConfig) -> MultiTaskTrainer:
    """The model, data and :class:`MultiTaskTrainer` of a config, ready to ``train()``."""
    args = config.training_arguments(**_training_defaults(config))
    _check_steps(args)
    _check_processes(args)
    set_seed(args.seed)
    experiment = build_experiment(config)
    splits = load_splits(experiment)
    train_collator, eval_collator = collators(experiment)
    return MultiTaskTrainer(
        model=experiment.model,
        args=args,
        train_dataset=MultiTaskDataset(config.tasks, [s.train for s in splits]),
        data_collator=train_collator,
        processing_class=experiment.tokenizer,
        eval_setup=EvalSetup(eval_sets(experiment, splits), eval_collator, experiment.family,
                             config.data.answer_scoring),
        sampling=config.sampling,
        head_learning_rate=config.model.head_learning_rate,
    )


def train(config: ExperimentConfig) -> dict:
    """Train, evaluate and fill the run folder; returns the final per-task results."""
    trainer = build_trainer(config)
    args = trainer.args
    run_dir = Path(args.output_dir)
    config = replace(config, training={**config.training, "output_dir": str(run_dir)})  # record the default too
    if trainer.is_world_process_zero():
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save(run_dir / CONFIG_FILE)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint or None)
    trainer.evaluate()
    results = {"model": config.model.name, "method": config.method.name, "step": trainer.state.global_step,
               **trainer.last_eval_results}
    trainer.save_model_atomically(run_dir / ADAPTER_DIR)  # on every rank: FSDP and DeepSpeed gather the weights
    if trainer.is_world_process_zero():
        write_metrics(run_dir / METRICS_FILE, results)
    return results


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


def _check_steps(args) -> None:
    if args.max_steps is None or args.max_steps <= 0:
        raise ConfigError(
            "training.max_steps must be set (e.g. --max_steps 300): multi-task sampling draws batches without "
            "end, so a run is measured in steps, not epochs."
        )


def write_metrics(path: str | Path, results: dict) -> None:
    """Write results as indented JSON (atomically: a reader never sees half a file)."""
    atomic_write_text(path, json.dumps(results, indent=2) + "\n")


# -- after training -------------------------------------------------------------------------------------------
def load_run(run_dir: str | Path, checkpoint: str | None = None) -> Experiment:
    """Rebuild a run's model from its ``config.yaml`` and load its final adapter (or ``checkpoint``)."""
    run_dir = Path(run_dir)
    config_path = run_dir / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder: it has no {CONFIG_FILE}. Train with `ept train`.")
    config = load_config(config_path)
    weights = Path(checkpoint) if checkpoint else run_dir / ADAPTER_DIR
    if not weights.is_dir():
        raise FileNotFoundError(f"{weights} does not exist: the run has not finished (pass --checkpoint DIR).")
    if checkpoint and (problem := checkpoint_problem(weights)):
        raise RunError(f"checkpoint {weights} is unusable: {problem}. Pass an older checkpoint-<step> folder.")
    set_seed(config.training_arguments().seed)  # a base built from model.config alone is then the same one
    experiment = build_experiment(config)
    load_trained(experiment.model, weights)
    experiment.model.eval()
    return experiment


def load_trained(model: nn.Module, folder: Path) -> None:
    """Load adapter (and heads) weights written by ``save_pretrained`` into a model built from the same config
    (for full fine-tuning, the whole model's weights).

    A folder written for another method or base model is refused with both named: PEFT would otherwise load
    only the keys that happen to match, or fail on the first shape that does not.
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
    except ValueError as err:  # heads for other tasks, a full fine-tuning folder of another model
        raise RunError(str(err)) from err
    except RuntimeError as err:
        if "size mismatch" not in str(err):
            raise
        raise RunError(f"{folder} does not fit this run's model, so it was trained on another base model or "
                       f"model.config: {str(err).strip().splitlines()[-1].strip()}") from err


def _check_adapter_folder(peft_model: PeftModel, folder: Path) -> None:
    """Refuse an adapter folder whose method or base model differs from the model's, naming both."""
    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        raise RunError(f"{folder} has no adapter_config.json: it is not an adapter folder written by `ept train`.")
    saved = json.loads(config_path.read_text())
    expected = peft_model.peft_config[peft_model.active_adapter]
    saved_type, expected_type = saved.get("peft_type"), getattr(expected.peft_type, "value", expected.peft_type)
    if saved_type != expected_type:
        raise RunError(f"{folder} holds a {saved_type} adapter, but this run's config builds {expected_type}: load "
                       "it with the config of the run that trained it.")
    # Compare model names, not paths: the same model may live in another folder on another machine.
    saved_base, expected_base = (Path(name or "").name for name in (saved.get("base_model_name_or_path"),
                                                                     expected.base_model_name_or_path))
    if saved_base != expected_base:
        raise RunError(f"{folder} was trained on base model {saved_base or '(built from model.config)'!r}, but "
                       f"this run's model is {expected_base or '(built from model.config)'!r}.")


def evaluate_run(run_dir: str | Path, split: str = "eval", checkpoint: str | None = None) -> dict:
    """Per-task results of a finished run (final adapter, or ``checkpoint``) on its ``eval`` or ``test`` split."""
    experiment = load_run(run_dir, checkpoint)
    splits = load_splits(experiment)
    _, eval_collator = collators(experiment)
    predictor = Predictor.for_run(experiment.model, experiment.family, eval_collator, experiment.tokenizer,
                                  experiment.config.training_arguments(), needs_task_ids(experiment.model),
                                  answer_scoring=experiment.config.data.answer_scoring)
    results = evaluate_tasks(predictor, eval_sets(experiment, splits, use_test=split == "test"))
    return {"model": experiment.config.model.name, "method": experiment.config.method.name,
            "weights": str(checkpoint or Path(run_dir) / ADAPTER_DIR), **results}


def export_run(run_dir: str | Path, task: str, mode: str, output: str | Path | None = None) -> Path:
    """Export the adapter of one task: ``mode="lora"`` a stock PEFT LoRA folder, ``"merged"`` a merged model.

    A heads model also gets that task's head, as ``head.safetensors`` (``weight``, ``bias``).
    """
    experiment = load_run(run_dir)
    if task not in experiment.config.tasks:
        raise RunError(f"task {task!r} was not trained in {run_dir}; it has {experiment.config.tasks}.")
    task_id = experiment.config.tasks.index(task)
    out = Path(output) if output else Path(run_dir) / EXPORT_DIR / f"{task}-{mode}"
    peft_model = experiment.peft_model
    routed = uses_task_ids(peft_model)  # stock LoRA is the same for every task: export it as it is
    if experiment.full and mode == "lora":
        raise RunError(f"{run_dir} is a full fine-tuning run: it has no adapter to export as LoRA. Use --mode merged "
                       "for the fine-tuned model itself.")
    if experiment.full and mode == "merged":
        peft_model.save_pretrained(out)
        experiment.tokenizer.save_pretrained(out)
    elif mode == "lora" and routed:
        export_lora(peft_model, task_id, out)
    elif mode == "lora":
        peft_model.save_pretrained(out)
    elif mode == "merged":
        merged = merge_for_task(peft_model, task_id) if routed else peft_model.merge_and_unload()
        merged.save_pretrained(out)
        experiment.tokenizer.save_pretrained(out)
    else:
        raise RunError(f"export mode must be 'lora' or 'merged', got {mode!r}.")
    if isinstance(experiment.model, MultiTaskClassifier):
        _save_head(experiment.model, task_id, out / "head.safetensors")
    write_model_card(experiment, task, mode, out, run_dir)
    return out


def _save_head(model: MultiTaskClassifier, task_id: int, path: Path) -> None:
    head = model.heads[task_id]
    save_file({"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()}, str(path))
