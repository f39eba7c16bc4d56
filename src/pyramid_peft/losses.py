"""The loss collector: auxiliary losses (contrastive task embeddings, load balance) of the adapted layers.

Layers keep what their loss needs from the last forward pass; :func:`aux_loss` turns that into one weighted scalar
to add to the task loss, so no model code is ever edited to carry the term. It knows the methods only as
:class:`LossSource` modules, so methods stand on this module and not the other way round.
"""

from __future__ import annotations

import torch
from torch import nn


class LossSource:
    """Mixin of the modules that report weighted auxiliary losses of their last forward (this package's tuners)."""

    def aux_losses(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def aux_loss(model: nn.Module, breakdown: bool = False):
    """The weighted auxiliary loss of the last forward pass (0 for methods without one).

    Each term is averaged over the layers that report it, then multiplied by its weight in the method's config
    (EPT: ``contrastive_weight`` times the mean contrastive loss over the chosen modules). With ``breakdown=True``
    returns a dict of the weighted terms instead, for logging.
    """
    terms: dict[str, torch.Tensor] = {}
    for source in (m for m in model.modules() if isinstance(m, LossSource)):
        for name, value in source.aux_losses().items():
            terms[name] = terms[name] + value if name in terms else value
    if breakdown:
        return terms
    if not terms:
        return torch.zeros((), device=_device_of(model))
    return torch.stack(list(terms.values())).sum()


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
