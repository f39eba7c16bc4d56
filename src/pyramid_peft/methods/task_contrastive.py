"""The contrastive task-embedding loss as a layer keeps it (EPT and MoRE; the maths is in ``contrastive.py``).

A layer with a task-embedding table ``<method>_task_embedding`` and a per-adapter flag ``<method>_contrastive``
(which modules feed the loss, set by the tuner) computes ``CrossEntropy(cos(h_i, E_j) / tau, task(i))`` on its pooled
input in each forward and reports it as its ``"contrastive"`` auxiliary term.

The term is computed inside the forward because that is where a sharded table is whole: under FSDP
(``torch.distributed.fsdp.fully_shard``) the parameters are gathered for the module's forward and backward only, and
outside them ``E`` is a shard (a ``DTensor``). The one exception is a training forward without autograd, the first
pass of reentrant gradient checkpointing: a term computed there could not train the table, so the pooled features are
kept and the term is computed from the table when the loss is collected (not possible on a sharded table, which says
so).
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from ..contrastive import pool_features, task_contrastive_loss
from .base import RoutedLayer


class TaskContrastiveLayer(RoutedLayer):
    """Mixin: compute the contrastive term in the forward and report it (config fields contrastive_pooling / _tau)."""

    def record_contrastive(self, adapter_name: str, x: torch.Tensor, task_ids: torch.Tensor | None = None) -> None:
        """Keep this forward's contrastive term for x's pooled features and the task ids (those of the route when
        not given) where the loss is on. An evaluation forward without autograd (serving) keeps none: it could
        train nothing, and costs a cosine table per module."""
        enabled = getattr(self, f"{self.method_key}_contrastive").get(adapter_name)
        enabled = enabled and (self.training or torch.is_grad_enabled())
        if enabled and task_ids is None:
            task_ids = self.task_ids_for(x, required=False)
        if not enabled or task_ids is None:
            self.clear_aux()
            return
        config = self.adapter_config(adapter_name)
        features = pool_features(x, config.contrastive_pooling, self.route)
        if self.training and not torch.is_grad_enabled():  # reentrant checkpointing: see the module docstring
            self.record_aux(adapter=adapter_name, features=features, task_ids=task_ids)
            return
        loss = task_contrastive_loss(features, self._task_table(adapter_name), task_ids, config.contrastive_tau)
        self.record_aux(adapter=adapter_name, contrastive=loss)

    def aux_terms(self, adapter_name: str) -> dict[str, torch.Tensor]:
        state = self.aux_record()
        if state.get("adapter") != adapter_name:
            return {}
        if "contrastive" in state:
            return {"contrastive": state["contrastive"]}
        table = self._task_table(adapter_name)
        if isinstance(table, DTensor):
            raise RuntimeError(
                f"{self.module_key}: the contrastive loss of a forward run without autograd (reentrant gradient "
                "checkpointing) needs the whole task-embedding table, which FSDP has sharded. Use non-reentrant "
                "checkpointing (gradient_checkpointing_kwargs={'use_reentrant': False}, the transformers default) or "
                "contrastive_weight=0."
            )
        tau = self.adapter_config(adapter_name).contrastive_tau
        return {"contrastive": task_contrastive_loss(state["features"], table, state["task_ids"], tau)}

    def _task_table(self, adapter_name: str) -> torch.Tensor:
        return getattr(self, f"{self.method_key}_task_embedding")[adapter_name]
