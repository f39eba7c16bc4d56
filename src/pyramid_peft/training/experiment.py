"""Building an experiment from a config: the resolved model, its tokenizer, the tasks, the adapted model, the data.

Everything here is made from a validated :class:`ExperimentConfig` (see :mod:`.validation`); nothing is written.
"""

from __future__ import annotations

from dataclasses import dataclass

from peft import PeftModel, get_peft_model
from torch import nn

from ..data import CausalLMCollator, ClassificationCollator, TextToTextCollator, build_splits
from ..models import ResolvedModel, load_model, load_tokenizer, resolve_model
from ..registry import lookup_method, make_peft_config
from ..tasks import TaskSpec
from ..tasks.declare import task_specs
from .config import ConfigError, ExperimentConfig
from .evaluate import EvalSet, EvalSetup, answer_token_budget
from .heads import MultiTaskClassifier
from .validation import method_options

_TASK_TYPES = {"seq2seq": "SEQ_2_SEQ_LM", "causal": "CAUSAL_LM", "encoder": None}


class RunError(ValueError):
    """A run folder cannot do what was asked (a task it did not train, a split its protocol lacks, a folder that
    holds a finished run)."""


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
        return lookup_method(self.config.method.name).full

    @property
    def peft_model(self) -> PeftModel:
        """The adapted model inside the heads (for full fine-tuning, the bare model)."""
        return self.model.encoder if isinstance(self.model, MultiTaskClassifier) else self.model


def build_experiment(config: ExperimentConfig, random_init: bool = False) -> Experiment:
    """Resolve the model, load it (or build it with random weights) and wrap it with the config's method."""
    tasks = task_specs(config.tasks)
    section = config.model
    resolved = resolve_model(section.name, section.tokenizer, section.config, section.family, section.trust_remote_code)
    _check_tasks_fit(tasks, resolved.family)
    tokenizer = load_tokenizer(resolved)
    base = load_model(resolved, section.dtype, random_init=random_init, quantization=section.quantization)
    if lookup_method(config.method.name).full:
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
            **_head_dropout(base.config),
        )
    return Experiment(config, resolved, tokenizer, tasks, model)


def _check_tasks_fit(tasks: list[TaskSpec], family: str) -> None:
    """Refuse, before the model loads, a task kind the model family cannot do."""
    for task in tasks:
        if task.is_generation and family == "encoder":
            raise ConfigError(
                f"tasks: task {task.name!r} is a generation task, but the model is an encoder, which has no decoder "
                "to generate text with: use a seq2seq (T5) or causal model, or drop the task."
            )
        if task.chat_template and family != "causal":
            raise ConfigError(
                f"tasks: task {task.name!r}: field 'chat_template' applies to causal (instruct) models; this model "
                f"is {family}: set chat_template: false."
            )


def _adapt(base: nn.Module, method_config, method: str) -> PeftModel:
    """``get_peft_model``, with its complaints about the config (targets, ranks) raised as :class:`ConfigError`."""
    try:
        return get_peft_model(base, method_config)
    except ValueError as err:
        linears = sorted({name.rsplit(".", 1)[-1] for name, m in base.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(
            f"method {method!r} cannot adapt this model: {err} (Its linear layers are named: "
            f"{', '.join(linears)}; method.target_modules picks among them.)"
        ) from err


def _head_dropout(model_config) -> dict:
    """The heads' ``dropout`` as transformers' sequence classifiers read it from the model config, if it has one."""
    for key in ("classifier_dropout", "hidden_dropout_prob"):
        if getattr(model_config, key, None) is not None:
            return {"dropout": getattr(model_config, key)}
    return {}


def peft_config(config: ExperimentConfig, family: str, num_tasks: int):
    """The method's PEFT config, with the task count and PEFT task type filled in from the experiment.

    The options were validated with the config (keys, types, ``num_tasks``); the method's own range checks run
    here, in its config class.
    """
    options = method_options(config.method.name, config.method.options, num_tasks)
    if _TASK_TYPES[family] is not None:
        options.setdefault("task_type", _TASK_TYPES[family])
    try:
        return make_peft_config(config.method.name, **options)
    except ValueError as err:  # a value out of range: the method's message names it and the fix
        raise ConfigError(f"method {config.method.name!r}: {err}") from err


def collators(experiment: Experiment) -> tuple[object, object]:
    """(training collator, evaluation collator) for the model family."""
    data, tokenizer, tasks = experiment.config.data, experiment.tokenizer, experiment.tasks
    if experiment.family == "encoder":
        collator = ClassificationCollator(tokenizer, max_length=data.max_source_length, tasks=tasks)
        return collator, collator
    if experiment.family == "causal":
        return (
            CausalLMCollator(tokenizer, max_length=data.max_source_length, tasks=tasks),
            CausalLMCollator(tokenizer, max_length=data.max_source_length, for_generation=True, tasks=tasks),
        )
    target_length = data.max_target_length or max(answer_token_budget(t, tokenizer, experiment.family) for t in tasks)
    collator = TextToTextCollator(tokenizer, data.max_source_length, target_length, tasks=tasks)
    return collator, collator


def load_splits(experiment: Experiment) -> list:
    """Each task's :class:`pyramid_peft.data.TaskSplits` under the config's protocol."""
    data, config_dir = experiment.config.data, experiment.config.config_dir
    return [
        build_splits(t, data.protocol, data.data_dir, max_eval=data.max_eval_examples, config_dir=config_dir)
        for t in experiment.tasks
    ]


def eval_sets(experiment: Experiment, splits: list, use_test: bool = False) -> list[EvalSet]:
    """Per-task evaluation sets (the test split with ``use_test``, where the protocol has one)."""
    sets = []
    for task_id, (task, split) in enumerate(zip(experiment.tasks, splits)):
        if use_test and split.test is None:
            if task.family == "declared":
                raise RunError(f"task {task.name!r} declares no test file: add data.test to its declaration.")
            raise RunError(f"protocol {experiment.config.data.protocol!r} has no test split for {task.name}.")
        examples, name = (split.test, split.test_split) if use_test else (split.eval, split.eval_split)
        sets.append(EvalSet(task, task_id, examples, name))
    return sets


def evaluation_setup(experiment: Experiment, splits: list, use_test: bool = False) -> EvalSetup:
    """What evaluating ``experiment`` takes: its per-task sets (:func:`eval_sets`), evaluation collator, tokenizer,
    family and answer scoring."""
    _, collator = collators(experiment)
    return EvalSetup(
        eval_sets(experiment, splits, use_test),
        collator,
        experiment.tokenizer,
        experiment.family,
        experiment.config.data.answer_scoring,
    )
