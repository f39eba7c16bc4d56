"""MultiLoRA as a PEFT tuner."""

from __future__ import annotations

from ..base import RoutedTuner
from .layer import Linear, MultiLoraLayer


class MultiLoraModel(RoutedTuner):
    """Injects :class:`~pyramid_peft.methods.multilora.layer.Linear` into the targeted layers of a model.

    The weight change does not depend on the task: ``task_ids`` may be passed (and are ignored) or left out.
    """

    tuner_layer_cls = MultiLoraLayer
    layer_cls = Linear
