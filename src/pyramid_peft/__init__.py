"""pyramid-peft: Expert Pyramid Tuning and its multi-task MoE-LoRA peers on stock Hugging Face PEFT.

Importing the package registers its methods with PEFT, so ``peft.get_peft_model(model, EptConfig(...))``,
``save_pretrained`` and ``PeftModel.from_pretrained`` work as for any built-in method.
"""

from .accounting import count_parameters
from .convert import ConversionError, convert_reference
from .data.task_ids import TaskIdsCollator
from .losses import aux_loss
from .merge import capabilities_of, export_lora, merge_for_task
from .methods.base import NotMergeableError, adapter_reads_task_ids
from .methods.capabilities import Capabilities, Merging, Routing
from .methods.ept import EptConfig
from .methods.hydralora import HydraLoraConfig
from .methods.mixlora import MixLoraConfig
from .methods.moelora import MoeLoraConfig
from .methods.more import MoreConfig
from .methods.multilora import MultiLoraConfig
from .methods.tucka import TuckaConfig, merge_tucka_route
from .registry import make_peft_config, method_names
from .routing import TaskRoutingError, attach_to_peft_model

__all__ = [
    "EptConfig",
    "HydraLoraConfig",
    "MixLoraConfig",
    "MoeLoraConfig",
    "MoreConfig",
    "MultiLoraConfig",
    "TuckaConfig",
    "Capabilities",
    "ConversionError",
    "Merging",
    "NotMergeableError",
    "Routing",
    "TaskIdsCollator",
    "TaskRoutingError",
    "adapter_reads_task_ids",
    "aux_loss",
    "capabilities_of",
    "convert_reference",
    "count_parameters",
    "enable_task_routing",
    "export_lora",
    "make_peft_config",
    "merge_for_task",
    "merge_tucka_route",
    "method_names",
]


def enable_task_routing(peft_model) -> None:
    """Make ``peft_model(..., task_ids=...)`` route (done automatically by ``get_peft_model``; idempotent)."""
    from .methods.base import find_tuners

    for tuner in find_tuners(peft_model):
        attach_to_peft_model(peft_model, tuner.route)
