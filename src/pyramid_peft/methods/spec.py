"""A method's one declaration, and the table that collects the declarations as the method packages are imported.

Each method package ends its ``__init__`` with ``register_method(MethodSpec(...))``. The spec names the method once:
its config / command-line name (``"ept"``), from which the PEFT type (``"EPT"``), the parameter prefix (``"ept_"``)
and the layers' attribute names (``ept_config``, ``ept_dropout``) follow, and its display name (``"EPT"``); its
capabilities are the config's ``capabilities()``. A method whose tuner only names its layer class gives that layer
class, and the spec builds the tuner; a method with a tuner of its own (MixLoRA, TuckA) gives the tuner instead.

PEFT's public ``register_peft_method`` only accepts members of its ``PeftType`` enum. ``PeftType`` is a ``str``
enum, so a string such as ``"EPT"`` works as a key beside the members: entering it into the config, tuner and
prefix tables makes ``get_peft_model``, ``save_pretrained`` and ``PeftModel.from_pretrained`` work unchanged. These
tables are private to PEFT; ``tests/test_registry.py`` guards the round trip against PEFT changes. The type is a
:class:`MethodType`, a ``str`` with PEFT's ``.value``, as PEFT's own code reads it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple

from peft import mapping as peft_mapping


class MethodType(str):
    """A method's PEFT type string (``"EPT"``) that also answers ``.value`` like a ``peft.PeftType`` member."""

    @property
    def value(self) -> str:
        return str(self)


class MethodSpec(NamedTuple):
    """One method: its config class, its name in configs (lower case), its display name, and how it adapts a
    model: ``layer_cls`` (the adapted ``nn.Linear``; the spec builds a ``RoutedTuner`` around it) or ``tuner_cls``
    (a ``RoutedTuner`` subclass of its own), exactly one of the two."""

    config_cls: type
    name: str
    title: str
    layer_cls: type | None = None
    tuner_cls: type | None = None

    @property
    def peft_type(self) -> MethodType:
        return MethodType(self.name.upper())

    @property
    def prefix(self) -> str:
        return f"{self.name}_"


REGISTERED: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Build the tuner where the spec names a layer class, name the classes from ``spec``, and enter the method into
    PEFT's tables and :data:`REGISTERED`. Returns the spec with its tuner."""
    if not spec.name.isidentifier() or spec.name != spec.name.lower():
        raise ValueError(f"method name {spec.name!r} must be a lower-case identifier (it is also the prefix).")
    if (spec.layer_cls is None) == (spec.tuner_cls is None):
        raise ValueError(f"MethodSpec {spec.name!r} needs exactly one of layer_cls and tuner_cls.")
    known = REGISTERED.get(spec.name)
    if known is not None and known.config_cls is not spec.config_cls:
        raise ValueError(f"method name {spec.name!r} is taken by {known.config_cls.__name__}.")
    if spec.tuner_cls is None:
        spec = spec._replace(tuner_cls=_tuner_for(spec))
    spec.config_cls.method_type = spec.peft_type
    spec.tuner_cls.prefix = spec.prefix
    spec.tuner_cls.method_name = spec.title
    spec.tuner_cls.tuner_layer_cls.method_key = spec.name
    peft_mapping.PEFT_TYPE_TO_CONFIG_MAPPING[spec.peft_type] = spec.config_cls
    peft_mapping.PEFT_TYPE_TO_TUNER_MAPPING[spec.peft_type] = spec.tuner_cls
    peft_mapping.PEFT_TYPE_TO_PREFIX_MAPPING[spec.peft_type] = spec.prefix
    REGISTERED[spec.name] = spec
    return spec


def _tuner_for(spec: MethodSpec) -> type:
    """``<Config name less "Config">Model``: a ``RoutedTuner`` that injects ``spec.layer_cls`` into the targeted
    linears, defined in the method's package."""
    from .base import RoutedTuner

    name = spec.config_cls.__name__.removesuffix("Config") + "Model"
    namespace = {
        "__module__": spec.config_cls.__module__.rpartition(".")[0] or spec.config_cls.__module__,
        "__doc__": f"{spec.title} as a PEFT tuner: injects {spec.layer_cls.__name__} into the targeted linears.",
        "tuner_layer_cls": spec.layer_cls,
        "layer_cls": spec.layer_cls,
    }
    return type(name, (RoutedTuner,), namespace)


# -- checkpoint converters: each method that imports another codebase's checkpoints registers its converter ---------
class Converter(NamedTuple):
    """How to turn a checkpoint of another codebase into this method's adapter.

    ``source`` is its ``ept convert --from`` name; ``tensor_names`` a regex of the tensor names after
    ``base_model.model.<module>.``; ``convert(modules, settings, src, **options)`` returns ``(config, state)`` from
    ``{module: {tensor: tensor}}`` and the source's ``adapter_config.json``; ``expected_shapes(config, linear)``
    the source tensors' shapes for a base-model linear (checked when the base model is given); ``options`` the
    keyword options it takes (``top_k``, ``num_tasks``, ``gate``).
    """

    source: str
    description: str
    tensor_names: str
    convert: Callable
    expected_shapes: Callable
    options: tuple[str, ...] = ()


CONVERTERS: dict[str, Converter] = {}
PREFIX = "base_model.model."  # what save_pretrained puts before a module's name in a checkpoint's keys


class ConversionError(ValueError):
    """The source folder is not a checkpoint of the named code, or does not fit the base model."""


def register_converter(converter: Converter) -> Converter:
    CONVERTERS[converter.source] = converter
    return converter


def exact_targets(modules) -> str:
    """A target_modules regex that matches exactly the named modules."""
    return "^(" + "|".join(re.escape(name) for name in sorted(modules)) + ")$"
