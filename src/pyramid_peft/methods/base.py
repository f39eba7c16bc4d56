"""What every routed method shares: the PEFT tuner and tuner-layer contracts plus task routing.

A method is a config, a layer (subclass of :class:`RoutedLayer` and ``nn.Module``) and a tuner (subclass of
:class:`RoutedTuner`). The tuner owns one :class:`~pyramid_peft.routing.TaskRoute` that all its layers read; the
layers state their per-task weight change through :meth:`RoutedLayer.task_lora_factors` (for merging and export)
and their auxiliary losses through :meth:`RoutedLayer.aux_terms`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from ..contrastive import contrastive_module_names
from ..losses import LossSource
from ..routing import TaskRoute, attach_to_peft_model, find_enclosing_peft_model, input_device
from .capabilities import Capabilities


def find_tuners(model: nn.Module) -> list[RoutedTuner]:
    """The tuners of this package inside ``model`` (a PeftModel, a tuner, or a module that holds one)."""
    return [m for m in model.modules() if isinstance(m, RoutedTuner)]


def uses_task_ids(model: nn.Module) -> bool:
    """Whether forward passes of ``model`` take ``task_ids`` (its methods route by task or report token routes
    per task); stock PEFT models do not."""
    return any(tuner.capabilities().reads_task_ids for tuner in find_tuners(model))


class NotMergeableError(RuntimeError):
    """Raised when a method's weight change depends on the input (token or batch routing) and cannot be merged."""


class RoutedLayer(BaseTunerLayer):
    """Mixin for an adapted ``nn.Linear`` whose adapters may be routed by task.

    Subclasses declare ``adapter_layer_names`` (per-adapter containers of trainable tensors) and
    ``parameter_groups`` (which of those containers are routers or task embeddings, for accounting).
    """

    parameter_groups: ClassVar[dict[str, str]] = {}  # container name -> "router" | "task_embedding"; default adapter
    route: TaskRoute | None = None

    def __init__(self, base_layer: nn.Module, route: TaskRoute | None):
        self.base_layer = base_layer
        self.route = route
        self.module_key = ""
        self.in_features, self.out_features = self.feature_sizes()

    def feature_sizes(self) -> tuple[int, int]:
        """(d_in, d_out) of the wrapped module; layers that wrap something other than a linear override this."""
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise TypeError(
                f"{type(self).__name__} adapts nn.Linear layers only, got {type(base).__name__}; "
                "choose target_modules that name linear layers."
            )
        return base.in_features, base.out_features

    def rank_limit(self) -> int | None:
        """The largest useful ``r`` here: a rank-r change of a d_in -> d_out map has rank at most min(d_in, d_out).

        None where the layer checks its rank itself.
        """
        return min(self.in_features, self.out_features)

    # -- what every adapted layer shares ------------------------------------------------------------------------
    @property
    def method_key(self) -> str:
        """The method's name as the layer's attributes spell it: ``ept`` for ``ept_config``, ``ept_dropout``."""
        return self.other_param_names[0].removesuffix("_config")

    def adapter_config(self, adapter_name: str):
        """The config of ``adapter_name`` (kept per adapter in ``<method>_config``)."""
        return getattr(self, f"{self.method_key}_config")[adapter_name]

    def scaling(self, adapter_name: str) -> float:
        """LoRA's output scale ``lora_alpha / r``."""
        config = self.adapter_config(adapter_name)
        return config.lora_alpha / config.r

    def add_dropout(self, adapter_name: str, p: float) -> None:
        """Dropout ``p`` on the adapter input of ``adapter_name`` (identity for p = 0), in ``<method>_dropout``."""
        getattr(self, f"{self.method_key}_dropout")[adapter_name] = nn.Dropout(p) if p else nn.Identity()

    def __repr__(self) -> str:
        return f"{self.method_key}." + super().__repr__()

    # -- routing helpers ---------------------------------------------------------------------------------------
    def task_ids_for(self, x: torch.Tensor, required: bool = True) -> torch.Tensor | None:
        """Task id of every row of ``x`` (``x`` is (batch, ..., d_in)); expanded for beam search."""
        batch = x.shape[0] if x.dim() > 1 else 1
        return self.route.task_ids(batch, x.device, required=required)

    def observe_routing(self, weights: torch.Tensor, task_ids: torch.Tensor | None = None) -> None:
        """Hand this forward's combine weights (batch first, experts last) to a listening analysis."""
        if self.route is not None:
            self.route.observe(self.module_key, weights, task_ids)

    def record_aux(self, **state: Any) -> None:
        """Keep this call's auxiliary-loss tensors (computed in this forward) in the call; skipped during a
        backward re-run (gradient checkpointing)."""
        call = self.route.recording()
        if call is not None:
            call.records[self] = state

    def clear_aux(self) -> None:
        """This forward produced no auxiliary loss (its adapter is off, or the loss is off for this module)."""
        call = self.route.recording()
        if call is not None:
            call.records.pop(self, None)

    def aux_record(self) -> dict[str, Any]:
        """What :meth:`record_aux` kept in the current call (or, after it, the last call of this thread)."""
        call = self.route.recent() if self.route is not None else None
        return {} if call is None else call.records.get(self, {})

    def call_scratch(self) -> dict:
        """Per-call scratch space shared by the layers of this call (hand-offs, caches of this call)."""
        return self.route.current().scratch

    def aux_terms(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """Unweighted auxiliary losses of the last forward, by name. Methods with none return ``{}``."""
        return {}

    # -- route entry --------------------------------------------------------------------------------------------
    def plan_request(self, call) -> torch.Tensor | None:
        """At route entry: a 1-D tensor of facts about ``call``'s route this layer wants on the host (e.g. which
        experts its tasks use), or None. The tuner fetches every layer's request in one synchronisation."""
        return None

    def accept_plan(self, call, values: list) -> None:
        """Receive the host values of :meth:`plan_request` (keep them in ``call.cache``)."""

    # -- merging ------------------------------------------------------------------------------------------------
    def task_lora_factors(self, adapter_name: str, task_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors ``(B, A)`` with ``B @ A`` equal to this layer's weight change for ``task_id`` (scale included).

        Raises :class:`NotMergeableError` where the change depends on the input.
        """
        raise NotMergeableError(f"{type(self).__name__} cannot state a fixed weight change.")

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotMergeableError(
            f"{type(self).__name__}'s weight change depends on the task: merge it for one task with "
            "pyramid_peft.merge_for_task(model, task_id), or export it with pyramid_peft.export_lora."
        )

    def unmerge(self) -> None:
        raise NotMergeableError("nothing is merged in place: merge_for_task returns a new model.")

    # -- shared plumbing ----------------------------------------------------------------------------------------
    def _active_for_forward(self) -> list[str]:
        if self.disable_adapters:
            return []
        return [a for a in self.active_adapters if a in self._adapter_names()]

    def _adapter_names(self) -> set[str]:
        container = getattr(self, self.adapter_layer_names[0])
        return set(container.keys())


class AdaptedLinear(nn.Module):
    """First base of each method's concrete ``Linear``: ``class Linear(AdaptedLinear, XLayer)``.

    It builds the layer mixin around ``base_layer``, adds the first adapter, and computes
    y = base(x) + sum over active adapters of ``_adapter_output(adapter_name, x)``. Listed first, its ``forward``
    (not ``nn.Module``'s placeholder) is the one called; methods that adapt differently override ``forward``.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, route: TaskRoute | None = None):
        nn.Module.__init__(self)
        super(nn.Module, self).__init__(base_layer, route)  # the method's layer mixin: next after nn.Module
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for adapter_name in self._active_for_forward():
            result = result + self._adapter_output(adapter_name, x).to(result.dtype)
        return result


class RoutedTuner(LossSource, BaseTuner):
    """Base tuner: builds layers of ``layer_cls`` around targeted linears and routes them by ``task_ids``."""

    layer_cls: ClassVar[type]
    target_module_mapping: ClassVar[dict] = {}  # no default targets: configs must name them
    method_name: ClassVar[str]
    # For methods with the contrastive task-embedding loss: the per-adapter dict on each layer saying whether that
    # layer's input feeds the loss (config fields contrastive_weight and contrastive_modules).
    contrastive_flags: ClassVar[str | None] = None

    def __init__(self, model, peft_config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None):
        config = peft_config[adapter_name] if isinstance(peft_config, dict) else peft_config
        # The route must exist before injection creates layers that hold it.
        self.__dict__["route"] = TaskRoute(getattr(config, "num_tasks", 1), self.method_name)
        self.route.planner = self._plan_call
        super().__init__(model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
        self._check_rank(config)
        wrapper = find_enclosing_peft_model()
        if wrapper is not None:
            attach_to_peft_model(wrapper, self.route)

    # -- BaseTuner contract -------------------------------------------------------------------------------------
    def _prepare_adapter_config(self, peft_config, model_config):
        if peft_config.target_modules is None:
            raise ValueError(
                f"{type(peft_config).__name__} needs target_modules (e.g. ['q', 'v'] for T5, "
                "['q_proj', 'v_proj'] for LLaMA): there is no default for this method."
            )
        return peft_config

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, config)
            return
        new_module = self._new_module(config, adapter_name, target, current_key)
        new_module.module_key = current_key
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _new_module(self, config, adapter_name: str, target: nn.Module, current_key: str) -> nn.Module:
        """The adapted layer that replaces ``target`` (methods that adapt several kinds of module override this)."""
        return self.layer_cls(target, adapter_name, config, route=self.route)

    def _check_rank(self, config) -> None:
        """Refuse an ``r`` above an adapted layer's :meth:`RoutedLayer.rank_limit`: that rank could not be used."""
        rank = getattr(config, "r", None)
        for name, layer in self.routed_layers():
            limit = layer.rank_limit()
            if rank is not None and limit is not None and rank > limit:
                raise ValueError(
                    f"r={rank} is larger than {name} ({layer.in_features} -> {layer.out_features}) allows: a change "
                    f"of that layer has rank at most {limit}. Use r <= {limit}, or leave it out of target_modules."
                )

    def capabilities(self, adapter_name: str | None = None) -> Capabilities:
        """The adapter's declared routing and merging (its config's :meth:`capabilities`)."""
        return self.peft_config[adapter_name or self.active_adapters[0]].capabilities()

    def check_mergeable(self, adapter_name: str | None = None) -> None:
        """Refuse, naming the method and the reason, an adapter whose weight change depends on the input."""
        capabilities = self.capabilities(adapter_name)
        if not capabilities.mergeable:
            raise NotMergeableError(f"{self.method_name} cannot be merged or exported as LoRA: {capabilities.reason}")

    def _check_merge_allowed(self):
        """PEFT's ``merge_and_unload``: nothing merges in place; say what to use instead."""
        self.check_mergeable()
        raise NotMergeableError(
            f"{self.method_name} is not merged in place by merge_and_unload(): use "
            "pyramid_peft.merge_for_task(model, task_id) for a merged copy (any task id where the change is the same "
            "for every task) or pyramid_peft.export_lora(model, task_id, out_dir) for a plain LoRA adapter."
        )

    def inject_adapter(self, model, adapter_name: str, *args, **kwargs) -> None:
        """PEFT's injection, then :meth:`_post_injection_hook`: ``PeftModel.add_adapter`` injects a second adapter
        without the hook the constructor runs, which would leave it the contrastive loss on every module."""
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        self._post_injection_hook(model, self.peft_config[adapter_name], adapter_name)

    def _post_injection_hook(self, model, config, adapter_name: str) -> None:
        """Choose the modules whose inputs feed the contrastive loss: the encoder's, where the model has one."""
        if self.contrastive_flags is None:
            return
        layers = {n: m for n, m in self.routed_layers() if adapter_name in getattr(m, self.contrastive_flags)}
        chosen = contrastive_module_names(list(layers), config.contrastive_modules)
        for name, layer in layers.items():
            getattr(layer, self.contrastive_flags)[adapter_name] = config.contrastive_weight > 0 and name in chosen

    # -- routing entry points -----------------------------------------------------------------------------------
    @torch.no_grad()
    def _plan_call(self, call) -> None:
        """Route entry: fetch what every layer asks about this call's route (:meth:`RoutedLayer.plan_request`) in
        one host synchronisation, so that no layer has to ask the device in its forward."""
        requests = [(layer, layer.plan_request(call)) for _, layer in self.routed_layers()]
        requests = [(layer, values) for layer, values in requests if values is not None]
        if not requests:
            return
        device = requests[0][1].device
        fetched = torch.cat([values.reshape(-1).to(device) for _, values in requests]).tolist()
        start = 0
        for layer, values in requests:
            layer.accept_plan(call, fetched[start : start + values.numel()])
            start += values.numel()

    def forward(self, *args: Any, task_ids=None, **kwargs: Any):
        with self.route.call(task_ids, kwargs.get("attention_mask"), input_device(kwargs)):
            return self.model(*args, **kwargs)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        with self.route.call(kwargs.get("task_ids"), kwargs.get("attention_mask"), input_device(kwargs)):
            yield

    # -- what the package-level helpers read --------------------------------------------------------------------
    def routed_layers(self) -> list[tuple[str, RoutedLayer]]:
        return [(name, m) for name, m in self.model.named_modules() if isinstance(m, RoutedLayer)]

    def aux_losses(self) -> dict[str, torch.Tensor]:
        """Weighted auxiliary losses of the last forward: each term averaged over the layers that produced it."""
        adapter = self.active_adapters[0]
        weights = self.peft_config[adapter].aux_loss_weights()
        sums: dict[str, list[torch.Tensor]] = {}
        for _, layer in self.routed_layers():
            for name, value in layer.aux_terms(adapter).items():
                sums.setdefault(name, []).append(value)
        return {name: weights[name] * torch.stack(values).mean() for name, values in sums.items() if weights.get(name)}
