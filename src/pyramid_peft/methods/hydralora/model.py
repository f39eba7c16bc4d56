"""HydraLoRA as a PEFT tuner."""

from __future__ import annotations

from ..base import RoutedTuner
from .layer import HydraLoraLayer, Linear


class HydraLoraModel(RoutedTuner):
    """Injects :class:`~pyramid_peft.methods.hydralora.layer.Linear` into the targeted layers of a model.

    Routing is per token: ``task_ids`` may be passed (and are ignored) or left out.
    """

    tuner_layer_cls = HydraLoraLayer
    layer_cls = Linear
