"""The methods a config or the command line may name, in one lookup: the registered methods (``methods/spec.py``),
stock PEFT LoRA (``lora``) and full fine-tuning (``full``, no adapter)."""

from __future__ import annotations

import dataclasses
import difflib
from typing import NamedTuple

from peft import LoraConfig, PeftConfig

from . import methods  # noqa: F401  (importing the methods registers them)
from .methods.spec import REGISTERED, MethodSpec

LORA, FULL = "lora", "full"

# name used in configs and on the command line -> its MethodSpec (config class first); the same dict that
# registrations fill, so a method registered later (a plug-in) appears here too
METHODS: dict[str, MethodSpec] = REGISTERED


class MethodChoice(NamedTuple):
    """One value of ``method.name``: its name and config class (None for full fine-tuning, which has no adapter)."""

    name: str
    config_cls: type[PeftConfig] | None

    @property
    def full(self) -> bool:
        """Full fine-tuning: every weight trains, no adapter."""
        return self.config_cls is None

    @property
    def takes_num_tasks(self) -> bool:
        return self.config_cls is not None and "num_tasks" in {f.name for f in dataclasses.fields(self.config_cls)}


def method_names() -> list[str]:
    """The adapter methods: stock LoRA, then the registered ones."""
    return [LORA, *sorted(METHODS)]


def method_choices() -> list[str]:
    """Every value ``method.name`` may take: the adapter methods and full fine-tuning."""
    return [*method_names(), FULL]


def lookup_method(method: str) -> MethodChoice:
    """The method named ``method`` (any case); an unknown name raises ``ValueError`` with the closest choice."""
    key = method.lower()
    if key == LORA:
        return MethodChoice(LORA, LoraConfig)
    if key == FULL:
        return MethodChoice(FULL, None)
    if key not in METHODS:
        hint = difflib.get_close_matches(key, method_choices(), n=1)
        extra = f" Did you mean {hint[0]!r}?" if hint else ""
        raise ValueError(f"Unknown method {method!r}; choose one of {method_choices()}.{extra}")
    return MethodChoice(key, METHODS[key].config_cls)


def make_peft_config(method: str, **kwargs) -> PeftConfig:
    """Build the config of ``method`` (``"lora"`` is stock ``peft.LoraConfig``) from keyword arguments."""
    choice = lookup_method(method)
    if choice.full:
        raise ValueError("method 'full' trains every weight: it has no adapter config.")
    return choice.config_cls(**kwargs)
