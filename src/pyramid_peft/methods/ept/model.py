"""EPT as a PEFT tuner."""

from __future__ import annotations

from ...contrastive import contrastive_module_names
from ..base import RoutedTuner
from .config import EptConfig
from .layer import EptLayer, Linear


class EptModel(RoutedTuner):
    """Injects :class:`~pyramid_peft.methods.ept.layer.Linear` into the targeted layers of a model."""

    prefix = "ept_"
    tuner_layer_cls = EptLayer
    layer_cls = Linear
    target_module_mapping: dict = {}
    method_name = "EPT"

    def _post_injection_hook(self, model, config: EptConfig, adapter_name: str) -> None:
        """Choose the modules whose inputs feed the contrastive loss: the encoder's, where the model has one."""
        layers = {name: layer for name, layer in self.routed_layers() if adapter_name in layer.ept_config}
        chosen = contrastive_module_names(list(layers), config.contrastive_modules)
        for name, layer in layers.items():
            layer.ept_contrastive[adapter_name] = config.contrastive_weight > 0 and name in chosen
