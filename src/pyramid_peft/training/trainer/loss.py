"""The training loss: the model's loss plus the method's auxiliary loss, whose terms are logged."""

from __future__ import annotations

import torch

from ...losses import aux_loss
from ..heads import forward_takes_task_ids


class AuxiliaryLoss:
    """Trainer mixin: ``compute_loss`` adds :func:`pyramid_peft.aux_loss`; ``log`` adds the mean of each term since
    the last training log line as ``aux_<term>``.

    Stock PEFT models' forwards reject ``task_ids``: the batch keeps them only where the model takes them.
    """

    _aux_totals: dict[str, float]
    _aux_count: int

    def _reset_aux(self) -> None:
        self._aux_totals, self._aux_count = {}, 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The model's loss plus the method's auxiliary loss (whose terms are kept for the next log line)."""
        if not forward_takes_task_ids(self.model):
            inputs = {k: v for k, v in inputs.items() if k != "task_ids"}
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        terms = aux_loss(self.accelerator.unwrap_model(model), breakdown=True)
        if terms:
            loss = loss + torch.stack([t.to(loss.device) for t in terms.values()]).sum()
            if model.training:
                self._record_aux(terms)
        return (loss, outputs) if return_outputs else loss

    def _record_aux(self, terms: dict[str, torch.Tensor]) -> None:
        for name, value in terms.items():
            self._aux_totals[name] = self._aux_totals.get(name, 0.0) + float(value.detach())
        self._aux_count += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the mean auxiliary-loss terms since the last training log as ``aux_<term>``."""
        if "loss" in logs and self._aux_count:
            logs.update({f"aux_{k}": v / self._aux_count for k, v in self._aux_totals.items()})
            self._reset_aux()
        super().log(logs, start_time)
