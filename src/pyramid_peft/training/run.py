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
from dataclasses import dataclass, fields
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import set_seed

from .. import count_parameters, export_lora, make_peft_config, merge_for_task, uses_task_ids
from ..data import CausalLMCollator, ClassificationCollator, TextToTextCollator, build_splits
from ..models import ResolvedModel, load_model, load_tokenizer, resolve_model
from ..registry import METHODS
from ..tasks import TaskSpec, get_task
from .config import ConfigError, ExperimentConfig, load_config
from .evaluate import EvalSet, Predictor, answer_token_budget, evaluate_tasks, metrics_table
from .heads import HEADS_FILE, MultiTaskClassifier
from .trainer import EvalSetup, MultiTaskDataset, MultiTaskTrainer

CONFIG_FILE = "config.yaml"
ADAPTER_DIR = "adapter"
METRICS_FILE = "metrics.json"
EXPORT_DIR = "export"
_TASK_TYPES = {"seq2seq": "SEQ_2_SEQ_LM", "causal": "CAUSAL_LM", "encoder": None}


@dataclass
class Experiment:
    """A config made concrete: the resolved model, its tokenizer, the tasks and the adapted model."""

    config: ExperimentConfig
    resolved: ResolvedModel
    tokenizer: object
    tasks: list[TaskSpec]
    model: nn.Module  # a MultiTaskClassifier (encoder family) or a PeftModel

    @property
    def family(self) -> str:
        return self.resolved.family

    @property
    def peft_model(self) -> PeftModel:
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
    peft_model = get_peft_model(base, peft_config(config, resolved.family, len(tasks)))
    model = peft_model
    if resolved.family == "encoder":
        model = MultiTaskClassifier(
            peft_model,
            [t.name for t in tasks],
            [t.num_labels for t in tasks],
            hidden_size=base.config.hidden_size,
            route_task_ids=uses_task_ids(peft_model),
        )
    return Experiment(config, resolved, tokenizer, tasks, model)


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
    if _TASK_TYPES[family] is not None:
        options.setdefault("task_type", _TASK_TYPES[family])
    return make_peft_config(method.name, **options)


def _method_fields(name: str) -> list[str]:
    """Keyword arguments the method's config class accepts (an unknown method is reported by the registry)."""
    key = name.lower()
    if key != "lora" and key not in METHODS:
        make_peft_config(name)  # raises the registry's "unknown method" error, with the valid names
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
            raise ValueError(f"protocol {experiment.config.data.protocol!r} has no test split for {task.name}.")
        examples, name = (split.test, split.test_split) if use_test else (split.eval, split.eval_split)
        sets.append(EvalSet(task, task_id, examples, name))
    return sets


# -- training -------------------------------------------------------------------------------------------------
def build_trainer(config: ExperimentConfig) -> MultiTaskTrainer:
    """The model, data and :class:`MultiTaskTrainer` of a config, ready to ``train()``."""
    args = config.training_arguments(**_training_defaults(config))
    _check_steps(args)
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
        eval_setup=EvalSetup(eval_sets(experiment, splits), eval_collator, experiment.family),
        sampling=config.sampling,
        head_learning_rate=config.model.head_learning_rate,
    )


def train(config: ExperimentConfig) -> dict:
    """Train, evaluate and fill the run folder; returns the final per-task results."""
    trainer = build_trainer(config)
    args = trainer.args
    run_dir = Path(args.output_dir)
    config.training["output_dir"] = str(run_dir)
    if trainer.is_world_process_zero():
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save(run_dir / CONFIG_FILE)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint or None)
    trainer.evaluate()
    results = {"model": config.model.name, "method": config.method.name, "step": trainer.state.global_step,
               **trainer.last_eval_results}
    if trainer.is_world_process_zero():
        trainer.model.save_pretrained(run_dir / ADAPTER_DIR)
        write_metrics(run_dir / METRICS_FILE, results)
    return results


def _training_defaults(config: ExperimentConfig) -> dict:
    """Defaults that depend on the experiment: the run folder, and DDP's unused-parameter search.

    Top-k routing leaves some experts without gradient in a step, and a heads model uses one head per batch:
    DDP must then look for unused parameters or it waits forever for their gradients.
    """
    return {
        "output_dir": f"runs/{'-'.join(config.tasks[:3]) or 'run'}",
        "ddp_find_unused_parameters": True,
    }


def _check_steps(args) -> None:
    if args.max_steps is None or args.max_steps <= 0:
        raise ConfigError(
            "training.max_steps must be set (e.g. --max_steps 300): multi-task sampling draws batches without "
            "end, so a run is measured in steps, not epochs."
        )


def write_metrics(path: str | Path, results: dict) -> None:
    """Write results as indented JSON."""
    Path(path).write_text(json.dumps(results, indent=2) + "\n")


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
    set_seed(config.training.get("seed", 42))  # a base built from model.config alone is then the same one
    experiment = build_experiment(config)
    load_trained(experiment.model, weights)
    experiment.model.eval()
    return experiment


def load_trained(model: nn.Module, folder: Path) -> None:
    """Load adapter (and heads) weights written by ``save_pretrained`` into a model built from the same config."""
    if isinstance(model, MultiTaskClassifier):
        model.load_trained(folder)
        return
    adapter = model.active_adapter
    model.load_adapter(str(folder), adapter_name=adapter, is_trainable=True)
    model.set_adapter(adapter)


def evaluate_run(run_dir: str | Path, split: str = "eval", checkpoint: str | None = None) -> dict:
    """Per-task results of a finished run (final adapter, or ``checkpoint``) on its ``eval`` or ``test`` split."""
    experiment = load_run(run_dir, checkpoint)
    splits = load_splits(experiment)
    _, eval_collator = collators(experiment)
    args = experiment.config.training_arguments()
    predictor = Predictor(
        model=experiment.model,
        family=experiment.family,
        collator=eval_collator,
        tokenizer=experiment.tokenizer,
        batch_size=args.per_device_eval_batch_size,
        route_task_ids=isinstance(experiment.model, MultiTaskClassifier) or uses_task_ids(experiment.model),
        num_beams=args.generation_num_beams or 1,
    )
    results = evaluate_tasks(predictor, eval_sets(experiment, splits, use_test=split == "test"))
    return {"model": experiment.config.model.name, "method": experiment.config.method.name,
            "weights": str(checkpoint or Path(run_dir) / ADAPTER_DIR), **results}


def export_run(run_dir: str | Path, task: str, mode: str, output: str | Path | None = None) -> Path:
    """Export the adapter of one task: ``mode="lora"`` a stock PEFT LoRA folder, ``"merged"`` a merged model.

    A heads model also gets that task's head, as ``head.safetensors`` (``weight``, ``bias``).
    """
    experiment = load_run(run_dir)
    if task not in experiment.config.tasks:
        raise ValueError(f"task {task!r} was not trained in {run_dir}; it has {experiment.config.tasks}.")
    task_id = experiment.config.tasks.index(task)
    out = Path(output) if output else Path(run_dir) / EXPORT_DIR / f"{task}-{mode}"
    peft_model = experiment.peft_model
    routed = uses_task_ids(peft_model)  # stock LoRA is the same for every task: export it as it is
    if mode == "lora" and routed:
        export_lora(peft_model, task_id, out)
    elif mode == "lora":
        peft_model.save_pretrained(out)
    elif mode == "merged":
        merged = merge_for_task(peft_model, task_id) if routed else peft_model.merge_and_unload()
        merged.save_pretrained(out)
        experiment.tokenizer.save_pretrained(out)
    else:
        raise ValueError(f"export mode must be 'lora' or 'merged', got {mode!r}.")
    if isinstance(experiment.model, MultiTaskClassifier):
        _save_head(experiment.model, task_id, out / "head.safetensors")
    return out


def _save_head(model: MultiTaskClassifier, task_id: int, path: Path) -> None:
    from safetensors.torch import save_file

    head = model.heads[task_id]
    save_file({"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()}, str(path))


def count_config_parameters(config: ExperimentConfig) -> dict:
    """``count_parameters`` of the config's model and method, built with random weights (no download needed).

    A heads model also reports its heads, as ``heads``.
    """
    experiment = build_experiment(config, random_init=True)
    counts = count_parameters(experiment.peft_model)
    if isinstance(experiment.model, MultiTaskClassifier):
        counts["heads"] = sum(p.numel() for p in experiment.model.heads.parameters())
    return counts

