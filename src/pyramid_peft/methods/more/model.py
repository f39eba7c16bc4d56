"""MoRE as a PEFT tuner."""

from __future__ import annotations

from ..base import RoutedTuner
from .config import MoreConfig
from ...contrastive import contrastive_module_names
from .layer import Linear, MoreLayer


class MoreModel(RoutedTuner):
    """Injects :class:`~pyramid_peft.methods.more.layer.Linear` into the targeted layers of a model."""

    prefix = "more_"
    tuner_layer_cls = MoreLayer
    layer_cls = Linear
    target_module_mapping: dict = {}
    method_name = "MoRE"

    def _post_injection_hook(self, model, config: MoreConfig, adapter_name: str) -> None:
        """Choose the modules whose inputs feed the contrastive loss: the encoder's, where the model has one."""
        layers = {name: layer for name, layer in self.routed_layers() if adapter_name in layer.more_config}
        chosen = contrastive_module_names(list(layers), config.contrastive_modules)
        for name, layer in layers.items():
            layer.more_contrastive[adapter_name] = config.contrastive_weight > 0 and name in chosen
