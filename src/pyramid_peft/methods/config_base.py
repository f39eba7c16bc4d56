"""Fields and checks every method config of this package shares."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import ClassVar, Union

import pydantic
from peft import PeftConfig

from .capabilities import Capabilities


def check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        hint = difflib.get_close_matches(str(value), [str(c) for c in choices if c is not None], n=1)
        extra = f" Did you mean {hint[0]!r}?" if hint else ""
        raise ValueError(f"{name}={value!r} is not one of {list(choices)}.{extra}")


# Fields PEFT fills in itself (type, version, base model): accepted, but not offered as options.
_PEFT_OWN_FIELDS = {f.name for f in dataclasses.fields(PeftConfig)}


def field_problems(config_cls: type, values: dict, prefix: str = "method.") -> list[str]:
    """Every problem of ``values`` as keyword arguments of the dataclass ``config_cls`` (a method config, or any
    config dataclass): unknown keys (with the closest valid key and the list of keys) and values whose type is not
    the field's annotation (checked strictly: ``"4"`` is not an int, an int is a float)."""
    fields = {f.name: f for f in dataclasses.fields(config_cls) if f.init}
    hints = typing.get_type_hints(config_cls)
    shown = sorted(set(fields) - _PEFT_OWN_FIELDS if issubclass(config_cls, PeftConfig) else fields)
    problems = []
    for key, value in values.items():
        if key not in fields:
            problems.append(unknown_key_message(f"{prefix}{key}", key, shown, config_cls.__name__))
        elif (expected := _type_problem(hints.get(key), value)) is not None:
            problems.append(f"{prefix}{key}={value!r} is a {type(value).__name__}; expected {expected}.")
    return problems


def unknown_key_message(shown: str, key: str, valid: list[str], owner: str) -> str:
    """``unknown key X``, the closest valid key (a key that ``key`` starts with, as ``r`` for ``rank``, or else the
    most similar one) and the valid keys (up to 40; beyond that, where they are documented: ``owner``'s fields)."""
    starts = [name for name in valid if key.startswith(name)]
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = max(starts, key=len) if starts else (close[0] if close else None)
    suggestion = f" Did you mean {hint!r}?" if hint else ""
    listing = ", ".join(valid) if len(valid) <= 40 else f"the fields of {owner}"
    return f"unknown key {shown!r}.{suggestion} Valid keys: {listing}."


def _type_problem(hint, value) -> str | None:
    """None when ``value`` fits the annotation ``hint``, else the annotation written for a user."""
    if hint is None:
        return None
    try:
        adapter = pydantic.TypeAdapter(hint, config=pydantic.ConfigDict(arbitrary_types_allowed=True))
    except (pydantic.PydanticSchemaGenerationError, pydantic.PydanticUserError, TypeError):
        return None  # an annotation pydantic cannot check: the class's own checks see the value
    try:
        adapter.validate_python(value, strict=True)
    except pydantic.ValidationError:
        return _type_name(hint)
    return None


def _type_name(hint) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (Union, types.UnionType):
        return " or ".join("None" if a is type(None) else _type_name(a) for a in args)
    if args:
        return f"{typing.get_origin(hint).__name__}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(hint, "__name__", str(hint))


def check_dropout(p: float, name: str = "lora_dropout") -> None:
    """A dropout probability must lie in [0, 1): 1 would drop every input."""
    if not isinstance(p, (int, float)) or not 0 <= p < 1:
        raise ValueError(f"{name}={p!r} must be in [0, 1).")


def check_positive(name: str, value) -> None:
    if value is None or value <= 0:
        raise ValueError(f"{name}={value!r} must be positive.")


@dataclass
class RoutedConfig(PeftConfig):
    """Base of this package's method configs: targeting, the number of tasks, and the PEFT type string.

    Args:
        target_modules: module names (suffix match) or one regex string naming the linear layers to adapt.
        exclude_modules: module names or a regex to leave out.
        num_tasks: number of task ids the method accepts.
        modules_to_save: extra modules to train and save in full (e.g. a classifier head).
    """

    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Names or a regex of the linear layers to adapt."}
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Names or a regex of modules to leave out."}
    )
    num_tasks: int = field(default=8, metadata={"help": "Number of task ids the method accepts."})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained and saved in full besides the adapters."}
    )

    method_type: ClassVar[str]

    def __post_init__(self):
        super().__post_init__()
        if not hasattr(type(self), "method_type"):
            raise TypeError(
                f"{type(self).__name__} is not a registered method: call register_method(MethodSpec(...)) in its "
                "package's __init__ (pyramid_peft.methods.spec)."
            )
        self.peft_type = self.method_type
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = set(self.exclude_modules)
        if not isinstance(self.num_tasks, int) or self.num_tasks < 1:
            raise ValueError(f"num_tasks={self.num_tasks!r} must be a positive integer (the number of task ids).")

    def capabilities(self) -> Capabilities:
        """How this configuration routes and whether it merges (see ``methods/capabilities.py``)."""
        raise NotImplementedError(f"{type(self).__name__} must declare its capabilities().")

    def aux_loss_weights(self) -> dict[str, float]:
        """Weight of each auxiliary loss this method's layers report (see ``RoutedLayer.aux_terms``)."""
        return {}
