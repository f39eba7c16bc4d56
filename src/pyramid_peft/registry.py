"""The one place that enters this package's methods into PEFT's lookup tables.

PEFT's public ``register_peft_method`` only accepts members of its ``PeftType`` enum. ``PeftType`` is a ``str``
enum, so a plain string such as ``"EPT"`` works as a key beside the members: entering it into the config, tuner and
prefix tables makes ``get_peft_model``, ``save_pretrained`` and ``PeftModel.from_pretrained`` work unchanged.
These tables are private to PEFT; ``tests/test_registry.py`` guards the round trip against PEFT changes.
"""

from __future__ import annotations

import difflib

from peft import LoraConfig, PeftConfig
from peft import mapping as peft_mapping

from .methods.ept import EptConfig, EptModel
from .methods.hydralora import HydraLoraConfig, HydraLoraModel
from .methods.mixlora import MixLoraConfig, MixLoraModel
from .methods.moelora import MoeLoraConfig, MoeLoraModel
from .methods.more import MoreConfig, MoreModel
from .methods.multilora import MultiLoraConfig, MultiLoraModel
from .methods.tucka import TuckaConfig, TuckaModel

# name used in configs and on the command line -> (config class, tuner class)
METHODS: dict[str, tuple[type, type]] = {
    "ept": (EptConfig, EptModel),
    "hydralora": (HydraLoraConfig, HydraLoraModel),
    "mixlora": (MixLoraConfig, MixLoraModel),
    "moelora": (MoeLoraConfig, MoeLoraModel),
    "more": (MoreConfig, MoreModel),
    "multilora": (MultiLoraConfig, MultiLoraModel),
    "tucka": (TuckaConfig, TuckaModel),
}


def register(config_cls: type, tuner_cls: type) -> None:
    """Enter one method under its PEFT type string (``config_cls.method_type``)."""
    peft_type = config_cls.method_type
    peft_mapping.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
    peft_mapping.PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = tuner_cls
    peft_mapping.PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = tuner_cls.prefix


def register_all() -> None:
    for config_cls, tuner_cls in METHODS.values():
        register(config_cls, tuner_cls)


def method_names() -> list[str]:
    return ["lora", *METHODS]


def make_peft_config(method: str, **kwargs) -> PeftConfig:
    """Build the config of ``method`` (``"lora"`` is stock ``peft.LoraConfig``) from keyword arguments."""
    key = method.lower()
    if key == "lora":
        return LoraConfig(**kwargs)
    if key not in METHODS:
        hint = difflib.get_close_matches(key, method_names(), n=1)
        extra = f" Did you mean {hint[0]!r}?" if hint else ""
        raise ValueError(f"Unknown method {method!r}; choose one of {method_names()}.{extra}")
    return METHODS[key][0](**kwargs)


register_all()
