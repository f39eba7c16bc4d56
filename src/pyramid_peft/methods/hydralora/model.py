"""HydraLoRA as a PEFT tuner."""

from __future__ import annotations

from ..base import NotMergeableError, RoutedTuner
from .layer import HydraLoraLayer, Linear


class HydraLoraModel(RoutedTuner):
    """Injects :class:`~pyramid_peft.methods.hydralora.layer.Linear` into the targeted layers of a model.

    Routing is per token: ``task_ids`` may be passed (and are ignored) or left out.
    """

    prefix = "hydralora_"
    tuner_layer_cls = HydraLoraLayer
    layer_cls = Linear
    method_name = "HydraLoRA"
    uses_task_ids = False  # the output never depends on task ids

    def _check_merge_allowed(self):
        raise NotMergeableError(
            "HydraLoRA cannot be merged: its router weighs the B heads per token, so the weight change depends on "
            "the input. Keep the adapter at inference."
        )
