"""MOELoRA as a PEFT tuner."""

from __future__ import annotations

from ..base import RoutedTuner
from .layer import Linear, MoeLoraLayer


class MoeLoraModel(RoutedTuner):
    """Injects :class:`~pyramid_peft.methods.moelora.layer.Linear` into the targeted layers of a model."""

    tuner_layer_cls = MoeLoraLayer
    layer_cls = Linear
