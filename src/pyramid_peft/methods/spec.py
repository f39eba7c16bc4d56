"""A method's one declaration, and the table that collects the declarations as the method packages are imported.

Each method package ends its ``__init__`` with ``register_method(MethodSpec(...))``. The spec names the method once:
its config / command-line name (``"ept"``), from which the PEFT type string (``"EPT"``) and the parameter prefix
(``"ept_"``) follow, and its display name (``"EPT"``); its capabilities are the config's ``capabilities()``.

PEFT's public ``register_peft_method`` only accepts members of its ``PeftType`` enum. ``PeftType`` is a ``str``
enum, so a plain string such as ``"EPT"`` works as a key beside the members: entering it into the config, tuner and
prefix tables makes ``get_peft_model``, ``save_pretrained`` and ``PeftModel.from_pretrained`` work unchanged. These
tables are private to PEFT; ``tests/test_registry.py`` guards the round trip against PEFT changes.
"""

from __future__ import annotations

from typing import NamedTuple

from peft import mapping as peft_mapping


class MethodSpec(NamedTuple):
    """One method: its config and tuner classes, its name in configs (lower case) and its display name."""

    config_cls: type
    tuner_cls: type
    name: str
    title: str

    @property
    def peft_type(self) -> str:
        return self.name.upper()

    @property
    def prefix(self) -> str:
        return f"{self.name}_"


REGISTERED: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Give the classes their names from ``spec`` and enter the method into PEFT's tables and :data:`REGISTERED`."""
    if not spec.name.isidentifier() or spec.name != spec.name.lower():
        raise ValueError(f"method name {spec.name!r} must be a lower-case identifier (it is also the prefix).")
    known = REGISTERED.get(spec.name)
    if known is not None and known.config_cls is not spec.config_cls:
        raise ValueError(f"method name {spec.name!r} is taken by {known.config_cls.__name__}.")
    spec.config_cls.method_type = spec.peft_type
    spec.tuner_cls.prefix = spec.prefix
    spec.tuner_cls.method_name = spec.title
    peft_mapping.PEFT_TYPE_TO_CONFIG_MAPPING[spec.peft_type] = spec.config_cls
    peft_mapping.PEFT_TYPE_TO_TUNER_MAPPING[spec.peft_type] = spec.tuner_cls
    peft_mapping.PEFT_TYPE_TO_PREFIX_MAPPING[spec.peft_type] = spec.prefix
    REGISTERED[spec.name] = spec
    return spec
