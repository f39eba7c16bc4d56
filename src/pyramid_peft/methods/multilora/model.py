"""MultiLoRA as a PEFT tuner."""

from __future__ import annotations

from ..base import NotMergeableError, RoutedTuner
from .layer import Linear, MultiLoraLayer


class MultiLoraModel(RoutedTuner):
    """Injects :class:`~pyramid_peft.methods.multilora.layer.Linear` into the targeted layers of a model.

    The weight change does not depend on the task: ``task_ids`` may be passed (and are ignored) or left out.
    """

    prefix = "multilora_"
    tuner_layer_cls = MultiLoraLayer
    layer_cls = Linear
    method_name = "MultiLoRA"
    uses_task_ids = False  # the output never depends on task ids

    def _check_merge_allowed(self):
        raise NotMergeableError(
            "MultiLoRA is not merged in place by merge_and_unload(); its weight change is the same for every task, "
            "so use pyramid_peft.merge_for_task(model, 0) for a merged copy or pyramid_peft.export_lora(model, 0, "
            "out_dir) for a plain LoRA adapter."
        )
