"""What a method's adapter can do, declared once by its config: how it routes and how it merges.

Every consumer branches on this one declaration: whether a forward pass needs ``task_ids``, whether
``merge_for_task`` / ``export_lora`` / ``ept export`` accept the adapter, and which error refuses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Routing(str, Enum):
    """What the weight change of one forward depends on."""

    NONE = "none"  # nothing: the same change for every input (MultiLoRA)
    TASK = "task"  # the example's task id (EPT, MOELoRA, MoRE)
    TOKEN = "token"  # each token's hidden state (MixLoRA, HydraLoRA, EPT with router_input='token')
    BATCH = "batch"  # the input batch (TuckA: one route per batch or per example, from the mean input)


class Merging(str, Enum):
    """Whether the change can be stated as fixed weights."""

    PER_TASK = "per_task"  # one exact ΔW per task id
    PER_MODEL = "per_model"  # one exact ΔW for the whole model (any task id gives the same)
    NONE = "none"  # the change depends on the input: refused, with the reason


@dataclass(frozen=True)
class Capabilities:
    """A method's routing and merging, plus (for ``Merging.NONE``) the reason and the way out, said to the user."""

    routing: Routing
    merging: Merging
    reason: str = ""

    def __post_init__(self):
        if self.merging is Merging.NONE and not self.reason:
            raise ValueError("a method that cannot merge must say why (Capabilities.reason).")

    @property
    def reads_task_ids(self) -> bool:
        """Forward passes take ``task_ids``: to route (task) or to attribute token routes to tasks (token)."""
        return self.routing in (Routing.TASK, Routing.TOKEN)

    @property
    def mergeable(self) -> bool:
        return self.merging is not Merging.NONE
