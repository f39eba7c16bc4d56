"""Experiment configs: YAML sections -> dataclasses, with command-line overrides on top.

A config file has six sections::

    model:    {name: minilm-l6, ...}          # ModelSection
    method:   {name: ept, r: 8, ...}          # name + keyword arguments of pyramid_peft.make_peft_config
    tasks:    [cola, sst2, {name: tickets, kind: classification, ...}]   # built-in names or declarations
    data:     {protocol: ept, ...}            # DataSection
    sampling: {strategy: temperature, ...}    # SamplingSection
    training: {max_steps: 300, ...}           # exactly the fields of transformers' Seq2SeqTrainingArguments

Overrides use the same names, dotted for a section (``--method.r 4``, ``--data.max_eval_examples 100``) and bare
for training fields and top-level keys (``--max_steps 20``, ``--output_dir X``, ``--tasks rte sst2``). A key that
does not exist is an error naming the closest valid key.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml
from transformers import Seq2SeqTrainingArguments

from ..atomic import atomic_write_text
from ..methods.config_base import unknown_key_message
from ..tasks.declare import entry_name
from .validation import ConfigError, check_config

SECTIONS = ("model", "method", "tasks", "data", "sampling", "training")
# Defaults for training fields whose stock default does not suit a multi-task run.
TRAINING_DEFAULTS = {"report_to": ["tensorboard"], "metric_for_best_model": "paper_average"}


class YamlLoader(yaml.SafeLoader):
    """YAML with the 1.2 reading of scalars that configs trip over in YAML 1.1.

    Only ``true``/``false`` are booleans (1.1 also reads ``no``, ``off``, ``yes``, ``on``, which turns
    ``eval_strategy: no`` into False), and ``3e-4`` is a float (1.1 wants ``3.0e-4``).
    """


_BOOL_TAG, _FLOAT_TAG = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag not in (_BOOL_TAG, _FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
YamlLoader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
YamlLoader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*)?\.[0-9_]*(?:[eE][-+]?[0-9]+)?"  # with a decimal point
        r"|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"  # exponent only: 3e-4
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def read_yaml(text: str):
    """Parse YAML text with :class:`YamlLoader`."""
    return yaml.load(text, Loader=YamlLoader)  # noqa: S506 (a SafeLoader subclass)


@dataclass
class ModelSection:
    """Which model to adapt.

    Args:
        name: hub id, local path, or an offline alias (``minilm-l6``, ``smollm2-135m``). May be empty when
            ``config.model_type`` is given: a random-init model is then built from ``config`` (tiny test models).
        tokenizer: tokenizer to use when it is not stored with the model.
        config: overrides applied to the model config (e.g. ``{dropout_rate: 0.0}``).
        family: ``seq2seq``, ``causal`` or ``encoder``; read from the model config when empty.
        dtype: weights dtype (``float32``, ``bfloat16``, ``auto``).
        quantization: load the base in 4 or 8 bits through bitsandbytes, e.g. ``{bits: 4, quant_type: nf4,
            double_quant: true, compute_dtype: bfloat16}``; empty means unquantized. The keys are the fields of
            :class:`pyramid_peft.models.quantized.Quantization`.
        trust_remote_code: allow model code from the hub; off unless asked for.
        head_learning_rate: learning rate of the classification heads (encoder family); empty means the
            adapters' ``training.learning_rate``. Fresh heads usually want a larger one than the adapters.
    """

    name: str | None = None
    tokenizer: str | None = None
    config: dict = field(default_factory=dict)
    family: str | None = None
    dtype: str = "float32"
    quantization: dict | None = None
    trust_remote_code: bool = False
    head_learning_rate: float | None = None


@dataclass
class MethodSection:
    """The adaptation method: ``name`` (``lora``, ``ept``, ...) and its keyword arguments."""

    name: str = "lora"
    options: dict = field(default_factory=dict)


@dataclass
class DataSection:
    """Where the data comes from and how it is cut.

    Args:
        data_dir: local data folder; empty means ``$EPT_DATA_DIR``, else the Hugging Face hub.
        protocol: split convention, ``ept`` (the EPT/MoRE code) or ``hyperformer``.
        max_source_length: tokens of the input (the whole prompt for causal models).
        max_target_length: tokens of the target; empty means the longest label word.
        max_eval_examples: cap on evaluation examples per task (empty: all).
        answer_scoring: how text-to-text and causal models answer in evaluation: ``generate`` (greedy, parsed, as
            the EPT code does) or ``likelihood`` (the label word the model finds most likely after the prompt, as
            zero-shot multiple-choice evaluation does; STS-B is still generated) or ``answer_text`` (the option
            whose own text is most likely after the question, per character: lm-evaluation-harness's ``acc_norm``,
            see ``pyramid_peft.training.answer_text``).
    """

    data_dir: str | None = None
    protocol: str = "ept"
    max_source_length: int = 128
    max_target_length: int | None = None
    max_eval_examples: int | None = None
    answer_scoring: str = "generate"


@dataclass
class SamplingSection:
    """How training batches are drawn from the tasks (see ``pyramid_peft.data.MultiTaskBatchSampler``).

    Args:
        strategy: ``uniform``, ``proportional``, ``temperature`` or ``exp``.
        temperature: T of temperature sampling (probability proportional to size^(1/T)).
        homogeneous: one task per batch (the EPT and HyperFormer convention) or mixed-task batches.
    """

    strategy: str = "temperature"
    temperature: float = 10.0
    homogeneous: bool = True


@dataclass
class ExperimentConfig:
    """A whole experiment; ``training`` holds Seq2SeqTrainingArguments keyword arguments.

    ``tasks`` holds built-in task names and task declarations (mappings, see :mod:`pyramid_peft.tasks.declare`);
    ``config_dir`` is the folder of the config file it was read from, where declared tasks' relative data paths
    are looked up last (not part of the config: not saved, not compared).
    """

    model: ModelSection = field(default_factory=ModelSection)
    method: MethodSection = field(default_factory=MethodSection)
    tasks: list[str | dict] = field(default_factory=list)
    data: DataSection = field(default_factory=DataSection)
    sampling: SamplingSection = field(default_factory=SamplingSection)
    training: dict = field(default_factory=dict)
    config_dir: ClassVar[str | None] = None  # set per instance by from_dict; not a section of the config

    @property
    def task_names(self) -> list[str]:
        """The name of each task, in task-id order."""
        return [entry_name(entry) for entry in self.tasks]

    def training_arguments(self, **defaults) -> Seq2SeqTrainingArguments:
        """Build the Trainer arguments; ``defaults`` fill fields the config leaves unset."""
        return Seq2SeqTrainingArguments(**{**TRAINING_DEFAULTS, **defaults, **self.training})

    def to_dict(self) -> dict:
        """Plain nested dict, the shape of a config file."""
        return {
            "model": dataclasses.asdict(self.model),
            "method": {"name": self.method.name, **self.method.options},
            "tasks": [dict(entry) if isinstance(entry, dict) else entry for entry in self.tasks],
            "data": dataclasses.asdict(self.data),
            "sampling": dataclasses.asdict(self.sampling),
            "training": dict(self.training),
        }

    def save(self, path: str | Path) -> None:
        """Write the config as YAML (the run folder's record of what ran), atomically."""
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


_SECTION_CLASSES = {"model": ModelSection, "data": DataSection, "sampling": SamplingSection}


def load_config(
    path: str | Path, overrides: list[str] | tuple[str, ...] = (), for_training: bool = False
) -> ExperimentConfig:
    """Read a YAML config and apply command-line style overrides (``["--max_steps", "20", ...]``); see
    :func:`from_dict` for the checks (``for_training``: also a step count and a model that can be found)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist.")
    raw = read_yaml_file(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections {SECTIONS}, got {type(raw).__name__}.")
    for key, value in parse_overrides(overrides).items():
        set_dotted(raw, key, value)
    return from_dict(raw, source=str(path), for_training=for_training, config_dir=str(path.parent))


def read_yaml_file(path: Path):
    """Parse a YAML file; a file that is not UTF-8 or not YAML is named with the line (and column) at fault."""
    try:
        return read_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}, line {line}: not UTF-8 text (byte {err.object[err.start]:#04x}); save the file as UTF-8."
        ) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{path}{where}: invalid YAML ({problem}). Fix the syntax there.") from None


def from_dict(
    raw: dict, source: str = "config", for_training: bool = False, config_dir: str | None = None
) -> ExperimentConfig:
    """Validate a nested dict into an :class:`ExperimentConfig` (``config_dir``: see its docstring).

    Every problem (unknown keys with the closest valid one, wrong types, out-of-range values, unknown or repeated
    tasks, an unknown method or method option) is collected in one pass and raised as one :class:`ConfigError`.
    """
    problems = [_unknown_key(key, SECTIONS, source) for key in raw if key not in SECTIONS]
    sections = {}
    for name, cls in _SECTION_CLASSES.items():
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            problems.append(f"section {name!r} must be a mapping, got {values!r}.")
            values = {}
        known = {f.name for f in dataclasses.fields(cls)}
        problems += [_unknown_key(f"{name}.{key}", known, source) for key in values if key not in known]
        sections[name] = cls(**{k: v for k, v in values.items() if k in known})
    method, training = raw.get("method") or {}, raw.get("training") or {}
    for name, values in (("method", method), ("training", training)):
        if not isinstance(values, dict):
            problems.append(f"section {name!r} must be a mapping, got {values!r}.")
    method, training = (v if isinstance(v, dict) else {} for v in (method, training))
    method = dict(method)
    tasks = raw.get("tasks") or []
    config = ExperimentConfig(
        method=MethodSection(name=str(method.pop("name", "lora")), options=method),
        tasks=[t if isinstance(t, dict) else str(t) for t in ([tasks] if isinstance(tasks, (str, dict)) else tasks)],
        training=dict(training),
        **sections,
    )
    config.config_dir = config_dir
    check_config(config, source, for_training, problems)
    return config


def parse_overrides(tokens: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["--max_steps", "20", "--method.kernel_sizes", "2", "4", "--bf16"]`` -> ``{"max_steps": 20, ...}``.

    Values are read as YAML scalars; several values after one key make a list; a key with no value is ``True``.
    ``--key=value`` works too.
    """
    parsed: dict[str, Any] = {}
    key = None
    for token in tokens:
        if token.startswith("--"):
            name, eq, value = token[2:].partition("=")
            if not name:
                raise ConfigError(f"override {token!r} has no key: write --key value, e.g. --max_steps 20.")
            key = name.replace("-", "_") if "." not in name else name
            parsed[key] = [_scalar(value)] if eq else []
        elif key is None:
            raise ConfigError(f"override value {token!r} has no key before it: write --key value.")
        else:
            parsed[key].append(_scalar(token))
    return {k: (True if not v else v[0] if len(v) == 1 else v) for k, v in parsed.items()}


def set_dotted(raw: dict, key: str, value: Any) -> None:
    """Set ``section.field`` (or ``section.field.key`` in a mapping field) in ``raw``; a bare key is a training
    field or a top-level key like ``tasks``."""
    section, dot, name = key.partition(".")
    if not dot:
        if key == "tasks":
            raw[key] = value if isinstance(value, list) else [value]
            return
        section, name = "training", key
    raw.setdefault(section, {})
    if not isinstance(raw[section], dict):
        raise ConfigError(f"override --{key}: section {section!r} is not a mapping in the config file.")
    target, (*parents, leaf) = raw[section], name.split(".")
    for parent in parents:  # a nested key, e.g. --model.quantization.bits 8
        if target.get(parent) is None:
            target[parent] = {}
        if not isinstance(target[parent], dict):
            raise ConfigError(f"override --{key}: {section}.{parent} is not a mapping in the config file.")
        target = target[parent]
    target[leaf] = value


def _scalar(text: str) -> Any:
    """Read one override value as YAML (``20`` -> int, ``true`` -> bool, ``[2,4]`` -> list, ``no`` -> str)."""
    try:
        return read_yaml(text)
    except yaml.YAMLError:
        return text


def _unknown_key(key: str, valid, source: str) -> str:
    section = key.partition(".")[0] if "." in key else "the config"
    return unknown_key_message(key, key.rpartition(".")[2], sorted(valid), section) + f" (in {source})"
