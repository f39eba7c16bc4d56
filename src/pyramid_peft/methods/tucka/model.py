"""TuckA as a PEFT tuner, pinning one fixed route, and merging the model for that route."""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..base import RoutedTuner, find_tuners
from ..capabilities import Capabilities, Merging, Routing
from .config import TuckaConfig
from .layer import Linear, TuckaLayer
from .router import Route, SharedRoute


class TuckaModel(RoutedTuner):
    """Injects :class:`~pyramid_peft.methods.tucka.layer.Linear` into the targeted layers and wires one router.

    The tuner owns the :class:`~pyramid_peft.methods.tucka.router.SharedRoute` all its layers reference, clears
    the route whenever a call enters the model (``forward``, ``generate``), and places the centroids on the owner
    layer: ``router_module`` if given, else the first adapted module in registration order.

    Gradient checkpointing: with ``use_reentrant=False`` (the transformers default) the routing gradient is exact.
    With ``use_reentrant=True`` the layers of checkpointed blocks other than the router's send no gradient to the
    centroids (the route they re-read was computed without a graph), the adapters themselves train normally.
    """

    tuner_layer_cls = TuckaLayer
    layer_cls = Linear

    def __init__(self, model, peft_config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None):
        self.__dict__["shared_route"] = SharedRoute()  # layers reference it from injection on
        super().__init__(model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """Inject the layers, then give one of them the router (also for adapters added later)."""
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        config: TuckaConfig = self.peft_config[adapter_name]
        layers = {name: layer for name, layer in self.routed_layers() if adapter_name in layer.tucka_config}
        if config.router_module is not None and config.router_module not in layers:
            hint = difflib.get_close_matches(config.router_module, list(layers), n=1)
            extra = f" Did you mean {hint[0]!r}?" if hint else ""
            raise ValueError(f"router_module={config.router_module!r} is not an adapted module of this model.{extra}")
        owner = layers[config.router_module] if config.router_module is not None else next(iter(layers.values()))
        owner.add_router(adapter_name, inference_mode=config.inference_mode)
        self.shared_route.owners[adapter_name] = owner
        for layer in layers.values():
            layer.tucka_shared = self.shared_route

    def delete_adapter(self, adapter_name: str) -> None:
        """PEFT's deletion, then the adapter's router owner, last route and pinned route."""
        super().delete_adapter(adapter_name)
        for table in (self.shared_route.owners, self.shared_route.routes, self.shared_route.pinned):
            table.pop(adapter_name, None)

    def capabilities(self, adapter_name: str | None = None) -> Capabilities:
        """Batch-routed, not mergeable; while a route is pinned (:func:`fixed_route`) the adapter is static."""
        if (adapter_name or self.active_adapters[0]) in self.shared_route.pinned:
            return Capabilities(Routing.NONE, Merging.PER_MODEL)
        return super().capabilities(adapter_name)

    # -- a new call gets a new route ----------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any):
        self.shared_route.clear()
        return super().forward(*args, **kwargs)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any):
        self.shared_route.clear()
        with super()._enable_peft_forward_hooks(*args, **kwargs):
            yield

    def last_route(self, adapter_name: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(group, weights) of the last forward, detached: () and (t,), or (batch,) and (batch, t) per example."""
        route = self.shared_route.routes.get(adapter_name or self.active_adapters[0])
        if route is None:
            raise RuntimeError("TuckA has not routed a forward pass yet: run the model once first.")
        return route.group.detach(), route.weights.detach()


@contextmanager
def fixed_route(model: nn.Module, group: int, weights, adapter_name: str | None = None) -> Iterator[None]:
    """Within the block, every TuckA layer of ``model`` uses the route (``group``, ``weights`` (t,)) instead of
    routing its input; the adapter is then static, so ``merge_for_task`` / ``export_lora`` accept it."""
    tuner = _tucka_tuner(model)
    adapter = adapter_name or tuner.active_adapters[0]
    config: TuckaConfig = tuner.peft_config[adapter]
    weights = torch.as_tensor(weights)
    if not 0 <= int(group) < config.k or weights.shape != (config.t,):
        raise ValueError(
            f"a TuckA route is a group in [0, {config.k}) and {config.t} weights, got group={group!r} and weights "
            f"of shape {tuple(weights.shape)}."
        )
    tuner.shared_route.pinned[adapter] = Route(torch.tensor(int(group)), weights)
    try:
        yield
    finally:
        tuner.shared_route.pinned.pop(adapter, None)


def merge_tucka_route(model: nn.Module, group: int, weights, adapter_name: str | None = None, inplace: bool = False):
    """A plain ``transformers`` model with ``W0 <- W0 + alpha W0 Û M̄ᵀ Ûᵀ`` (row convention: x ↦ x (I + alpha Û M̄
    Ûᵀ) before W0) in every adapted TuckA layer, for the fixed route (``group``, ``weights``): exact for every
    batch that takes this route."""
    with fixed_route(model, group, weights, adapter_name):
        return _tucka_tuner(model).merged_model(0, adapter_name, inplace=inplace)


def _tucka_tuner(model: nn.Module) -> TuckaModel:
    tuners = [t for t in find_tuners(model) if isinstance(t, TuckaModel)]
    if len(tuners) != 1:
        raise ValueError(f"expected a model with one TuckA adapter (from get_peft_model), found {len(tuners)}.")
    return tuners[0]
