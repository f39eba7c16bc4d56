"""What every routed method shares: the PEFT tuner and tuner-layer contracts plus task routing.

A method is a config, a layer (subclass of :class:`RoutedLayer` and ``nn.Module``) and a tuner (subclass of
:class:`RoutedTuner`). The tuner owns one :class:`~pyramid_peft.routing.TaskRoute` that all its layers read; the
layers state their per-task weight change through :meth:`RoutedLayer.task_lora_factors` (for merging and export)
and their auxiliary losses through :meth:`RoutedLayer.aux_terms`.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ..contrastive import contrastive_module_names
from ..losses import LossSource
from ..models.quantized import dequantized
from ..routing import TaskRoute, attach_to_peft_model, find_enclosing_peft_model, input_device
from .capabilities import Capabilities, Merging


def find_tuners(model: nn.Module) -> list[RoutedTuner]:
    """The tuners of this package inside ``model`` (a PeftModel, a tuner, or a module that holds one)."""
    return [m for m in model.modules() if isinstance(m, RoutedTuner)]


def adapter_reads_task_ids(model: nn.Module) -> bool:
    """Whether the adapters in ``model`` read ``task_ids`` (their method routes by task, or reports token routes
    per task: :attr:`Capabilities.reads_task_ids`); stock PEFT adapters do not. Whether a model's *forward* accepts
    them is another question (heads take them too): ``pyramid_peft.training.heads.forward_takes_task_ids``."""
    return any(tuner.capabilities().reads_task_ids for tuner in find_tuners(model))


class NotMergeableError(RuntimeError):
    """Raised when a method's weight change depends on the input (token or batch routing) and cannot be merged."""


def merge_compute_dtype(device: torch.device | str) -> torch.dtype:
    """float64 on the CPU, so the merge adds no rounding of its own; float32 on accelerators, where MPS has no float64
    and most GPUs run it at a small fraction of float32 speed (float32's rounding, about 1e-7 relative, stays far
    below that of the bfloat16 or float16 weights usually served there)."""
    return torch.float64 if torch.device(device).type == "cpu" else torch.float32


@torch.no_grad()
def merged_weight(weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor, sign: int = 1) -> torch.Tensor:
    """``weight + sign * up @ down`` in ``weight``'s dtype, summed in :func:`merge_compute_dtype` of the weight's
    device (float64 on the CPU, float32 on accelerators) and rounded once, at the final cast. Every merge and unmerge
    goes through here."""
    compute = merge_compute_dtype(weight.device)
    delta = up.to(weight.device, compute) @ down.to(weight.device, compute)
    return (weight.to(compute) + sign * delta).to(weight.dtype)


class RoutedLayer(BaseTunerLayer):
    """Mixin for an adapted ``nn.Linear`` whose adapters may be routed by task.

    Subclasses declare ``adapter_layer_names`` (per-adapter containers of trainable tensors) and
    ``parameter_groups`` (which of those containers are routers or task embeddings, for accounting).
    """

    parameter_groups: ClassVar[dict[str, str]] = {}  # container name -> "router" | "task_embedding"; default adapter
    # The method's name as the layer's attributes spell it (``ept`` for ``ept_config``, ``ept_dropout``): set from
    # the method's spec by ``register_method``.
    method_key: ClassVar[str]
    # Per-adapter dicts besides PEFT's two lists that delete_adapter must empty too (plans, caches).
    adapter_state_names: ClassVar[tuple[str, ...]] = ()
    route: TaskRoute | None = None

    def __init__(self, base_layer: nn.Module, route: TaskRoute | None):
        self.base_layer = base_layer
        self.route = route
        self.merged_adapters: list[str] = []  # PEFT's class-level default list would be shared by every layer
        self._merged_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
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

    def delete_adapter(self, adapter_name: str) -> None:
        """PEFT's deletion (``adapter_layer_names`` and ``other_param_names``), then the adapter's dropout and
        :attr:`adapter_state_names`: nothing of the adapter stays behind."""
        super().delete_adapter(adapter_name)
        for name in (f"{self.method_key}_dropout", *self.adapter_state_names):
            container = getattr(self, name, {})
            if adapter_name in container:
                del container[adapter_name]

    def _add_adapter_output(self, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result`` plus the change ``adapter_name`` makes to ``x`` (a method that can add into ``result`` in
        place overrides this)."""
        return result + self._adapter_output(adapter_name, x).to(result.dtype)

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

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None, task_id: int | None = None):
        """Add the weight change of ``task_id`` (any id where the change is the same for every task) to the base
        weight, for the active (or named) adapters; :meth:`unmerge` takes exactly that change back out.

        With ``safe_merge`` the sum is checked for NaN / inf before the weight is touched.
        """
        for adapter_name in check_adapters_to_merge(self, adapter_names):
            merging = self.adapter_config(adapter_name).capabilities().merging
            if task_id is None and merging is Merging.PER_TASK:
                raise NotMergeableError(
                    f"{self.module_key or type(self).__name__}: adapter {adapter_name!r} merges per task: name the "
                    "task, e.g. model.merge_and_unload(task_id=t) or model.merge_adapter(task_id=t)."
                )
            weight = self.get_base_layer().weight
            if not weight.dtype.is_floating_point:
                raise NotMergeableError(
                    f"{self.module_key}: the base weight is quantized ({weight.dtype}): a change cannot be added to "
                    "it in place; take a merged copy, dequantized, with pyramid_peft.merge_for_task(model, task_id)."
                )
            up, down = (f.detach().clone() for f in self.task_lora_factors(adapter_name, task_id or 0))
            merged = merged_weight(weight, up, down)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(
                    f"NaNs or infs detected in the merged weights of {self.module_key}: the adapter "
                    f"{adapter_name!r} seems to be broken; nothing was merged in this layer."
                )
            with torch.no_grad():
                weight.copy_(merged)
            self._merged_factors[adapter_name] = (up, down)
            self.merged_adapters.append(adapter_name)

    def unmerge(self) -> None:
        """Subtract every merged change, newest first (the factors kept at merge time)."""
        while self.merged_adapters:
            adapter_name = self.merged_adapters.pop()
            up, down = self._merged_factors.pop(adapter_name)
            weight = self.get_base_layer().weight
            with torch.no_grad():
                weight.copy_(merged_weight(weight, up, down, sign=-1))

    # -- shared plumbing ----------------------------------------------------------------------------------------
    def _active_for_forward(self) -> list[str]:
        """The adapters whose change a forward adds: active, present here, and not merged into the weight (a
        disabled layer first takes its merged changes back out, as PEFT's LoRA does)."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return []
        present = getattr(self, self.adapter_layer_names[0])
        return [a for a in self.active_adapters if a in present and a not in self.merged_adapters]


class AdaptedLinear(nn.Module):
    """First base of each method's concrete ``Linear``: ``class Linear(AdaptedLinear, XLayer)``.

    It builds the layer mixin around ``base_layer``, adds the first adapter, and computes
    y = base(x) + sum over active adapters of ``_adapter_output(adapter_name, x)`` (through
    ``_add_adapter_output``, which a method overrides where it can add into ``y`` in place). Listed first, its
    ``forward`` (not ``nn.Module``'s placeholder) is the one called; methods that adapt differently override
    ``forward``.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, route: TaskRoute | None = None):
        nn.Module.__init__(self)
        super(nn.Module, self).__init__(base_layer, route)  # the method's layer mixin: next after nn.Module
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for adapter_name in self._active_for_forward():
            result = self._add_adapter_output(adapter_name, x, result)
        return result


class RoutedTuner(LossSource, BaseTuner):
    """Base tuner: builds layers of ``layer_cls`` around targeted linears and routes them by ``task_ids``."""

    layer_cls: ClassVar[type]
    target_module_mapping: ClassVar[dict] = {}  # no default targets: configs must name them
    method_name: ClassVar[str]

    @property
    def contrastive_flags(self) -> str | None:
        """For methods with the contrastive task-embedding loss (a ``<method>_contrastive`` dict among the layer's
        ``other_param_names``): that dict's name. It says per adapter whether a layer's input feeds the loss
        (config fields contrastive_weight and contrastive_modules)."""
        name = f"{self.tuner_layer_cls.method_key}_contrastive"
        return name if name in self.tuner_layer_cls.other_param_names else None

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
        """PEFT's checks (tied embeddings), then each active adapter's capabilities: one whose change depends on
        the input is refused with the method's reason."""
        super()._check_merge_allowed()
        for adapter_name in self.active_adapters:
            self.check_mergeable(adapter_name)

    def check_task_id(self, adapter_name: str, task_id: int) -> None:
        """Refuse a ``task_id`` outside ``[0, num_tasks)`` of the adapter."""
        num_tasks = self.peft_config[adapter_name].num_tasks
        if not isinstance(task_id, int) or isinstance(task_id, bool) or not 0 <= task_id < num_tasks:
            raise ValueError(f"task_id={task_id!r} is outside [0, {num_tasks}) for adapter {adapter_name!r}.")

    @torch.no_grad()
    def task_factors(self, task_id: int, adapter_name: str | None = None) -> dict[str, tuple]:
        """``{module name: (B, A)}`` for every adapted layer: the exact weight change of ``task_id``."""
        adapter = adapter_name or self.active_adapters[0]
        self.check_mergeable(adapter)
        self.check_task_id(adapter, task_id)
        return {name: layer.task_lora_factors(adapter, task_id) for name, layer in self.routed_layers()}

    @torch.no_grad()
    def merged_model(self, task_id: int, adapter_name: str | None = None, inplace: bool = False) -> nn.Module:
        """The base model with ``W0 + ΔW(task_id)`` in every adapted layer (``pyramid_peft.merge_for_task``).

        A copy unless ``inplace=True``, which saves a copy of the base model's memory and leaves this tuner
        unusable. A quantized (bitsandbytes) base is dequantized first, into its compute dtype
        (:func:`pyramid_peft.models.quantized.dequantized`): ``ΔW`` cannot be added to 4- or 8-bit weights without
        being quantized away.
        """
        factors = self.task_factors(task_id, adapter_name)
        layers = dict(self.routed_layers())
        if inplace:
            merged, linears = self.model, {name: layer.get_base_layer() for name, layer in layers.items()}
            for name, linear in linears.items():
                parent_name, _, child = name.rpartition(".")
                setattr(merged.get_submodule(parent_name) if parent_name else merged, child, linear)
        else:
            # Copy the model with each adapted layer replaced by a copy of its frozen linear: adapter tensors (and
            # any autograd state they hold) are never copied.
            linears = {name: copy.deepcopy(layer.get_base_layer()) for name, layer in layers.items()}
            memo = {id(layers[name]): linear for name, linear in linears.items()}
            merged = copy.deepcopy(self.model, memo)
        merged = dequantized(merged)  # replaces quantized linears: look each one up again by name
        for name, (up, down) in factors.items():
            linear = merged.get_submodule(name)
            linear.weight.copy_(merged_weight(linear.weight, up, down))
        merged.__dict__.pop("peft_config", None)
        return merged

    # -- PEFT's merging API, with the task to merge ------------------------------------------------------------
    def merge_adapter(
        self, adapter_names: list[str] | None = None, safe_merge: bool = False, task_id: int | None = None
    ) -> None:
        """Merge the active (or named) adapters into the base weights in place, for ``task_id``.

        A method whose change is the same for every task (MultiLoRA, a pinned TuckA route) needs no ``task_id``; a
        task-routed one (EPT, MOELoRA, MoRE) merges the change of the task named; one whose change depends on the
        input (token or batch routing) is refused with its reason. ``unmerge_adapter()`` takes it back out. The
        result equals :func:`pyramid_peft.merge_for_task` for the same task.
        """
        names = adapter_names if adapter_names is not None else self.active_adapters
        self._check_merge_allowed()
        for adapter_name in names:
            self.check_mergeable(adapter_name)
            if task_id is not None:
                self.check_task_id(adapter_name, task_id)
            elif self.capabilities(adapter_name).merging is Merging.PER_TASK:
                raise NotMergeableError(
                    f"{self.method_name} changes the weights per task: name the task to merge, "
                    "model.merge_and_unload(task_id=t) or model.merge_adapter(task_id=t), or take a merged copy "
                    "with pyramid_peft.merge_for_task(model, t)."
                )
        for _, layer in self.routed_layers():
            layer.merge(safe_merge=safe_merge, adapter_names=adapter_names, task_id=task_id)

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
        task_id: int | None = None,
    ) -> nn.Module:
        """PEFT's ``merge_and_unload`` with the task to merge (see :meth:`merge_adapter`): the base model, its
        adapted linears now ``W0 + ΔW(task_id)``."""
        self.merge_adapter(adapter_names, safe_merge=safe_merge, task_id=task_id)
        return self._unload_and_optionally_merge(merge=False, progressbar=progressbar)

    def delete_adapter(self, adapter_name: str) -> None:
        """PEFT's deletion (each layer's :meth:`RoutedLayer.delete_adapter`), then the adapter's auxiliary-loss
        records in the finished calls the route still holds."""
        super().delete_adapter(adapter_name)
        for call in self.route.finished_calls():
            for layer in [layer for layer, record in call.records.items() if record.get("adapter") == adapter_name]:
                del call.records[layer]

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
            output = self.model(*args, **kwargs)
            self.route.bind_backward(output)
            return output

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
