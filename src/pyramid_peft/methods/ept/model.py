"""EPT as a PEFT tuner."""

from __future__ import annotations

from ..base import RoutedTuner
from .layer import EptLayer, Linear


class EptModel(RoutedTuner):
    """Injects :class:`~pyramid_peft.methods.ept.layer.Linear` into the targeted layers of a model."""

    tuner_layer_cls = EptLayer
    layer_cls = Linear
    contrastive_flags = "ept_contrastive"
