"""MoRE as a PEFT tuner."""

from __future__ import annotations

from ..base import RoutedTuner
from .layer import Linear, MoreLayer


class MoreModel(RoutedTuner):
    """Injects :class:`~pyramid_peft.methods.more.layer.Linear` into the targeted layers of a model."""

    tuner_layer_cls = MoreLayer
    layer_cls = Linear
    contrastive_flags = "more_contrastive"
