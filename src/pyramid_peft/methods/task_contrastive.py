"""The contrastive task-embedding loss as a layer keeps it (EPT and MoRE; the maths is in ``contrastive.py``).

A layer with a task-embedding table ``<method>_task_embedding`` and a per-adapter flag ``<method>_contrastive``
(which modules feed the loss, set by the tuner) records its pooled input and the task ids in each forward, and
reports ``CrossEntropy(cos(h_i, E_j) / tau, task(i))`` as its ``"contrastive"`` auxiliary term.
"""

from __future__ import annotations

import torch

from ..contrastive import pool_features, task_contrastive_loss
from .base import RoutedLayer


class TaskContrastiveLayer(RoutedLayer):
    """Mixin: record the contrastive loss's inputs and report the loss (config fields contrastive_pooling / _tau)."""

    def record_contrastive(self, adapter_name: str, x: torch.Tensor, task_ids: torch.Tensor | None = None) -> None:
        """Keep x's pooled features and the task ids (those of the route when not given) where the loss is on."""
        enabled = getattr(self, f"{self.method_key}_contrastive").get(adapter_name)
        if enabled and task_ids is None:
            task_ids = self.task_ids_for(x, required=False)
        if not enabled or task_ids is None:
            self.clear_aux()
            return
        pooling = self.adapter_config(adapter_name).contrastive_pooling
        self.record_aux(features=pool_features(x, pooling, self.route), task_ids=task_ids)

    def aux_terms(self, adapter_name: str) -> dict[str, torch.Tensor]:
        table = getattr(self, f"{self.method_key}_task_embedding")
        if not self._aux_state or adapter_name not in table:
            return {}
        tau = self.adapter_config(adapter_name).contrastive_tau
        return {"contrastive": task_contrastive_loss(table=table[adapter_name], tau=tau, **self._aux_state)}
