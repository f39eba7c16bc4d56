"""The optimizer: the stock one, with a heads model's classification heads at their own learning rate."""

from __future__ import annotations

from ..heads import MultiTaskClassifier


class HeadLearningRate:
    """Trainer mixin: ``create_optimizer`` moves a heads model's heads into groups at ``self.head_learning_rate``
    (None: the adapters' learning rate)."""

    head_learning_rate: float | None

    def create_optimizer(self, model=None):
        """The stock optimizer, with a heads model's heads moved to groups at ``head_learning_rate``."""
        optimizer = super().create_optimizer(model)
        target = self.model if model is None else model
        if self.head_learning_rate is None or not isinstance(target, MultiTaskClassifier):
            return optimizer
        head_ids = {id(p) for p in target.heads.parameters()}
        for group in list(optimizer.param_groups):
            heads = [p for p in group["params"] if id(p) in head_ids]
            if heads:
                group["params"] = [p for p in group["params"] if id(p) not in head_ids]
                optimizer.add_param_group({**group, "params": heads, "lr": self.head_learning_rate})
        return optimizer
