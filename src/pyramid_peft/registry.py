"""The methods this package offers, as the method packages registered them (``methods/spec.py``)."""

from __future__ import annotations

import difflib

from peft import LoraConfig, PeftConfig

from . import methods  # noqa: F401  (importing the methods registers them)
from .methods.spec import REGISTERED, MethodSpec

# name used in configs and on the command line -> its MethodSpec (config class first); the same dict that
# registrations fill, so a method registered later (a plug-in) appears here too
METHODS: dict[str, MethodSpec] = REGISTERED


def method_names() -> list[str]:
    return ["lora", *sorted(METHODS)]


def make_peft_config(method: str, **kwargs) -> PeftConfig:
    """Build the config of ``method`` (``"lora"`` is stock ``peft.LoraConfig``) from keyword arguments."""
    key = method.lower()
    if key == "lora":
        return LoraConfig(**kwargs)
    if key not in METHODS:
        hint = difflib.get_close_matches(key, method_names(), n=1)
        extra = f" Did you mean {hint[0]!r}?" if hint else ""
        raise ValueError(f"Unknown method {method!r}; choose one of {method_names()}.{extra}")
    return METHODS[key].config_cls(**kwargs)
