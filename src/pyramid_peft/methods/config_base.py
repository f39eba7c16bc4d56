"""Fields and checks every method config of this package shares."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import ClassVar, Optional, Union

from peft import PeftConfig

from .capabilities import Capabilities


def check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        hint = difflib.get_close_matches(str(value), [str(c) for c in choices if c is not None], n=1)
        extra = f" Did you mean {hint[0]!r}?" if hint else ""
        raise ValueError(f"{name}={value!r} is not one of {list(choices)}.{extra}")


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

    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Names or a regex of the linear layers to adapt."}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Names or a regex of modules to leave out."}
    )
    num_tasks: int = field(default=8, metadata={"help": "Number of task ids the method accepts."})
    modules_to_save: Optional[list[str]] = field(
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
