"""The whole config checked in one pass, before anything loads or is written: every problem is reported at once.

Types come from the dataclasses themselves (the config sections, ``Seq2SeqTrainingArguments``, each method's
config class) through :func:`pyramid_peft.methods.config_base.field_problems`; ranges, choices, task names and
model names are checked here. Each problem names the key, the value and what is expected.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import TYPE_CHECKING

from transformers import Seq2SeqTrainingArguments

from ..data.declared import declared_data_problems
from ..data.sampling import STRATEGIES
from ..data.splits import PROTOCOLS
from ..methods.config_base import field_problems
from ..models import FAMILIES, model_name_problem
from ..models.quantized import Quantization
from ..registry import lookup_method, make_peft_config, method_choices
from ..tasks.declare import task_specs, tasks_problems

if TYPE_CHECKING:  # annotations only: config.py imports this module to check what it reads
    from .config import ExperimentConfig

DTYPES = ("float32", "float64", "float16", "bfloat16", "auto")
ANSWER_SCORING = ("generate", "likelihood", "answer_text")
# Training fields that must be positive when set, and those that must not be negative.
_POSITIVE_TRAINING = (
    "learning_rate",
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "logging_steps",
    "save_steps",
    "eval_steps",
)
_NON_NEGATIVE_TRAINING = ("warmup_steps", "weight_decay", "max_grad_norm", "seed", "save_total_limit")


class ConfigError(ValueError):
    """A config file or override names an unknown key or holds a value of the wrong kind."""


def check_config(
    config: ExperimentConfig, source: str = "config", for_training: bool = False, problems: list[str] | None = None
) -> None:
    """Raise one :class:`ConfigError` listing every problem of ``config`` (and ``problems`` found before, such as
    unknown section keys); ``for_training`` also requires ``max_steps`` and a model that can be found."""
    found = [*(problems or []), *config_problems(config, for_training)]
    if found:
        listed = "\n".join(f"  - {problem}" for problem in found)
        raise ConfigError(f"{source} has {len(found)} problem{'s' if len(found) > 1 else ''}:\n{listed}")


def config_problems(config: ExperimentConfig, for_training: bool = False) -> list[str]:
    """Every problem of ``config``, as one message each (empty when it is valid)."""
    return [
        *_section_problems(config),
        *_task_problems(config, for_training),
        *method_problems(config),
        *_training_problems(config.training, for_training),
        *_model_problems(config, for_training),
    ]


def method_options(method: str, options: dict, num_tasks: int) -> dict:
    """The method's keyword arguments, ``num_tasks`` defaulting to the number of tasks where the method takes it."""
    options = dict(options)
    if lookup_method(method).takes_num_tasks:
        options.setdefault("num_tasks", num_tasks)
    return options


def method_problems(config: ExperimentConfig) -> list[str]:
    """The method name, its options (keys and types, generically over its config class), ``num_tasks`` against
    the tasks, and the method's own range checks (its config class built once, offline)."""
    name, options = config.method.name, config.method.options
    if name.lower() not in method_choices():
        return [_unknown_choice("method.name", name, method_choices())]
    choice = lookup_method(name)
    if choice.full:
        return (
            [
                f"method 'full' trains every weight and takes no options, got {sorted(options)}: remove them (the "
                "learning rate is training.learning_rate)."
            ]
            if options
            else []
        )
    problems = field_problems(choice.config_cls, options, "method.")
    if problems:
        return problems
    num_tasks, tasks = options.get("num_tasks"), len(config.tasks)
    if choice.takes_num_tasks and num_tasks is not None and num_tasks < tasks:
        return [
            f"method.num_tasks={num_tasks} is smaller than the {tasks} tasks configured {config.task_names}, whose "
            f"ids run up to {tasks - 1}: remove method.num_tasks (it defaults to the number of tasks) or set it "
            f"to at least {tasks}."
        ]
    try:
        make_peft_config(name, **method_options(name, options, max(tasks, 1)))
    except (ValueError, TypeError) as err:
        return [f"method {name!r}: {err}"]
    return []


def _unknown_choice(key: str, value, valid) -> str:
    close = difflib.get_close_matches(str(value).lower(), list(valid), n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"{key}={value!r} is not one of: {', '.join(valid)}.{hint}"


def _section_problems(config: ExperimentConfig) -> list[str]:
    problems = []
    for name in ("model", "data", "sampling"):
        section = getattr(config, name)
        values = {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}
        problems += field_problems(type(section), values, f"{name}.")
    if problems:  # ranges and choices of values of the wrong type would only repeat the problem
        return problems
    model, data, sampling = config.model, config.data, config.sampling
    problems += _choice("model.family", model.family, FAMILIES, optional=True)
    problems += _choice("model.dtype", model.dtype, DTYPES)
    problems += _quantization_problems(config)
    problems += _choice("data.protocol", data.protocol, PROTOCOLS)
    problems += _choice("data.answer_scoring", data.answer_scoring, ANSWER_SCORING)
    problems += _choice("sampling.strategy", sampling.strategy, STRATEGIES)
    problems += _positive("model.head_learning_rate", model.head_learning_rate)
    problems += _positive("data.max_source_length", data.max_source_length)
    problems += _positive("data.max_target_length", data.max_target_length)
    problems += _positive("data.max_eval_examples", data.max_eval_examples)
    problems += _positive("sampling.temperature", sampling.temperature)
    return problems


def _quantization_problems(config: ExperimentConfig) -> list[str]:
    """``model.quantization``: its keys and types (the fields of :class:`Quantization`), then its values."""
    section = config.model.quantization
    if section is None:
        return []
    name = config.method.name
    if name.lower() in method_choices() and lookup_method(name).full:
        return [
            "model.quantization: method 'full' trains every weight, and quantized weights do not train: use "
            "an adapter method (e.g. method.name: lora), or remove model.quantization."
        ]
    return field_problems(Quantization, section, "model.quantization.") or Quantization(**section).problems()


def _task_problems(config: ExperimentConfig, for_training: bool) -> list[str]:
    """The task list (names and declarations); for training, also each declared task's files (opened, not kept)."""
    tasks = config.tasks
    if not tasks and for_training:
        return ["tasks: the config lists no tasks: add e.g. tasks: [rte, sst2]."]
    problems = tasks_problems(tasks)
    if problems or not for_training:
        return problems
    return declared_data_problems(task_specs(tasks), config.data.data_dir, config.config_dir)


def _training_problems(training: dict, for_training: bool) -> list[str]:
    # resume_from_checkpoint is annotated str, but the Trainer (and --resume_from_checkpoint alone) also take True.
    typed = {k: v for k, v in training.items() if k != "resume_from_checkpoint" or not isinstance(v, bool)}
    problems = field_problems(Seq2SeqTrainingArguments, typed, "training.")
    if problems:
        return problems
    for key in _POSITIVE_TRAINING:
        problems += _positive(f"training.{key}", training.get(key))
    for key in _NON_NEGATIVE_TRAINING:
        value = training.get(key)
        if value is not None and value < 0:
            problems.append(f"training.{key}={value!r} must not be negative.")
    steps = training.get("max_steps")
    if (steps is not None and steps <= 0) or (steps is None and for_training):
        problems.append(
            f"training.max_steps must be set to a positive number of steps, got {steps!r} (e.g. "
            "--max_steps 300): multi-task sampling draws batches without end, so a run is measured in "
            "steps, not epochs."
        )
    return problems


def _model_problems(config: ExperimentConfig, for_training: bool) -> list[str]:
    name = config.model.name
    if not for_training or not isinstance(name, str) or not name:
        return []
    problem = model_name_problem(name)
    return [problem] if problem else []


def _choice(key: str, value, choices, optional: bool = False) -> list[str]:
    if value is None and optional:
        return []
    return [] if value in choices else [_unknown_choice(key, value, choices)]


def _positive(key: str, value) -> list[str]:
    return [] if value is None or value > 0 else [f"{key}={value!r} must be positive (> 0)."]
