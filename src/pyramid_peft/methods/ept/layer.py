"""The EPT layer: a frozen linear plus a routed pyramid of deconvolution experts over one shared seed.

Forward, for an input row x of task t (arXiv 2603.12577, eq. 4):

    y = W0 x + b0 + (alpha / r) * sum_e g_e(t) ΔW_e dropout(x)

Experts are grouped by kernel size: same-size experts share their seed slice, so a group costs one pass with
the gate-weighted sum of its kernels. The groups a call uses run as one LoRA-shaped pair of matrix products whose
rank is r times the sum of their kernel sizes (``experts.py``): for one route (every row of one task) the kernels
are folded into the up factor; for mixed rows the up factor is ``B ⊗ I`` and each row's kernels act on the r x k
hidden states in between. Two cheaper forms of mixed rows, both exact: where each task of the call has enough
tokens, rows are sorted by task and each task's block runs through its own top-k groups (their down factors,
``A ⊗ I``, applied as dilated convolutions on the CPU where that saves enough arithmetic, ``experts.KronDown``);
in the decoding steps of ``generate`` (a few tokens, every weight read per step) each group runs from the
Kronecker structure, ``B (A X) Kᵀ``, reading the seed instead of factors of rank r*k. The d_out x d_in matrix is
never built.

Which groups a call's tasks use is asked of the device once per call, at route entry, for every layer together
(:meth:`EptLayer.plan_request`); a layer's forward never synchronises the host, unless the router changed in place
during the call (then the layer plans again). Constants (ALP's scales, the
expert order) are non-persistent buffers that move with the model. Within one call without autograd (a
``generate`` call, a serving forward) the factors are built once and reused by every decoding step; they are
rebuilt when a weight changes.
"""

from __future__ import annotations

import math
import operator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from torch import nn
from torch.distributed.tensor import DTensor

from ...gating import reference_double_softmax, topk_softmax
from ..base import AdaptedLinear, NotMergeableError
from ..task_contrastive import TaskContrastiveLayer
from . import experts
from .config import EptConfig
from .pyramid import KernelGroup, alp_scales, plan_groups

# Rows grouped by task pay from this many tokens per task of the call (below it, e.g. in decoding steps, the
# fewer products of the shared path win; measured by benchmarks/serving.py).
TOKENS_PER_TASK = 32
_TASK_COUNTS = "ept-task-counts"  # keys in a call's cache, fetched with the plan: its rows per task (host ints)
_IN_TASK_ORDER = "ept-in-task-order"  # and whether its ids are in ascending task order
_GATHERED_STEPS = "ept-gathered-steps"  # the buffers of the call's decoding steps, per layout and shape


class EptLayer(TaskContrastiveLayer):
    adapter_layer_names = ("ept_A", "ept_B", "ept_kernels", "ept_gate", "ept_task_embedding")
    other_param_names = ("ept_config", "ept_contrastive", "ept_scale_A", "ept_scale_B", "ept_expert_order")
    parameter_groups = {"ept_gate": "router", "ept_task_embedding": "task_embedding"}
    adapter_state_names = ("_plans", "_known_routes")

    def __init__(self, base_layer: nn.Module, route):
        super().__init__(base_layer, route)
        self.ept_A = nn.ParameterDict()
        self.ept_B = nn.ParameterDict()
        self.ept_kernels = nn.ParameterDict()
        self.ept_gate = nn.ModuleDict()
        self.ept_task_embedding = nn.ParameterDict()
        self.ept_dropout = nn.ModuleDict()
        self.ept_config: dict[str, EptConfig] = {}
        self.ept_contrastive: dict[str, bool] = {}
        # Constants per adapter: ALP's scales of the seed factors (broadcast over A and B) and the order that puts
        # same-size experts side by side (only where kernel_sizes does not already).
        self.ept_scale_A = BufferDict(persistent=False)
        self.ept_scale_B = BufferDict(persistent=False)
        self.ept_expert_order = BufferDict(persistent=False)
        self._plans: dict[str, tuple] = {}
        # Per adapter, the last planned task-weight table, the experts it uses (host booleans) and what it was
        # computed from: a later call whose router is unchanged plans without recomputing or fetching them.
        self._known_routes: dict[str, _KnownRoute] = {}

    def rank_limit(self) -> None:
        """None: ``r`` is the rank of the seed, which :meth:`update_layer` checks against the kernel sizes."""
        return None

    # -- construction -------------------------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: EptConfig) -> None:
        d_out, d_in = self.out_features, self.in_features
        groups, m_total, n_total, offsets = plan_groups(config, d_out, d_in)
        smallest = min(min(g.m, g.n) for g in groups)
        if smallest < 1 or config.r > max(m_total, n_total):
            raise ValueError(
                f"EPT on {self.module_key or 'a layer'} ({d_in} -> {d_out}): kernel sizes {config.kernel_sizes} and "
                f"r={config.r} do not fit (seed {m_total} x {n_total}); use smaller kernels or a smaller r."
            )
        self.ept_config[adapter_name] = config
        self.ept_contrastive.setdefault(adapter_name, config.contrastive_weight > 0)
        self._plans[adapter_name] = (groups, offsets)
        self.ept_A[adapter_name] = nn.Parameter(torch.empty(config.r, n_total))
        self.ept_B[adapter_name] = nn.Parameter(torch.empty(m_total, config.r))
        kernel_total = sum(experts.kernel_numel(d_out, k, config.expert_form) for k in config.kernel_sizes)
        self.ept_kernels[adapter_name] = nn.Parameter(torch.empty(kernel_total))
        self.ept_gate[adapter_name] = nn.Linear(d_in, len(config.kernel_sizes), bias=True)
        if config.uses_task_embedding:
            self.ept_task_embedding[adapter_name] = nn.Parameter(torch.empty(config.num_tasks, d_in))
        self.add_dropout(adapter_name, config.lora_dropout)
        self.reset_parameters(adapter_name)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self._add_constants(adapter_name, alp_scales(config, groups, m_total, n_total), groups)
        self.set_adapter(self.active_adapters)

    def _add_constants(self, adapter_name: str, scales, groups: list[KernelGroup]) -> None:
        """ALP's scales as buffers shaped to multiply A (r x n) and B (m x r), and the grouped expert order, on the
        adapter's device. The scales stay float64 (exact; cast at use) until ``model.to(dtype)`` casts them."""
        device = self.ept_A[adapter_name].device
        if scales is not None:
            dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
            scales = [None if scale is None else scale.to(device, dtype) for scale in scales]
            a_rows, a_cols, b_rows = scales
            self.ept_scale_A[adapter_name] = a_rows[:, None] if a_rows is not None else a_cols[None, :]
            if b_rows is not None:
                self.ept_scale_B[adapter_name] = b_rows[:, None]
        order = [e for group in groups for e in group.experts]
        if order != sorted(order):
            self.ept_expert_order[adapter_name] = torch.tensor(order, device=device)

    def reset_parameters(self, adapter_name: str) -> None:
        config = self.ept_config[adapter_name]
        A, B, kernels = self.ept_A[adapter_name], self.ept_B[adapter_name], self.ept_kernels[adapter_name]
        with torch.no_grad():
            if config.factor_init == "gaussian":
                nn.init.normal_(A, std=1.0 / config.r)
                nn.init.normal_(B, std=1.0 / config.r)
            else:
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
                if config.factor_init == "kaiming":
                    nn.init.kaiming_uniform_(B, a=math.sqrt(5))
                else:
                    nn.init.zeros_(B)
            if config.resolved_kernel_init == "zeros":
                nn.init.zeros_(kernels)
            elif config.resolved_kernel_init == "unit":
                kernels.uniform_(-math.sqrt(3.0), math.sqrt(3.0))  # unit variance: each ΔW entry is S[i,j] K[p,q]
            else:
                for e, k in enumerate(config.kernel_sizes):
                    view = self._kernel(adapter_name, e)
                    view.uniform_(-1.0, 1.0).mul_(
                        1.0 / math.sqrt(view.numel() if config.expert_form == "code1d" else k * k)
                    )
            if adapter_name in self.ept_task_embedding:
                nn.init.normal_(self.ept_task_embedding[adapter_name], std=0.01)
            self.ept_gate[adapter_name].reset_parameters()

    # -- parameter views ----------------------------------------------------------------------------------------
    def _kernel(self, adapter_name: str, expert: int) -> torch.Tensor:
        """Expert ``expert``'s kernel: (k, k) for kron2d, (floor(d_out/k), k) for code1d (a view)."""
        config = self.ept_config[adapter_name]
        k = config.kernel_sizes[expert]
        _, offsets = self._plans[adapter_name]
        rows = k if config.expert_form == "kron2d" else self.out_features // k
        flat = self.ept_kernels[adapter_name]
        return flat[offsets[expert] : offsets[expert] + rows * k].view(rows, k)

    def _scaled_seed(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole seed factors (A, B) with the dimension-aware scaling applied (once per forward)."""
        A, B = self.ept_A[adapter_name], self.ept_B[adapter_name]
        if adapter_name in self.ept_scale_A:
            A = A * self.ept_scale_A[adapter_name].to(A.dtype)
        if adapter_name in self.ept_scale_B:
            B = B * self.ept_scale_B[adapter_name].to(B.dtype)
        return A, B

    @staticmethod
    def _slice_seed(seed: tuple[torch.Tensor, torch.Tensor], group: KernelGroup) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_k, B_k): the group's slice of the (scaled) seed factors."""
        A, B = seed
        return A[:, group.a_offset : group.a_offset + group.n], B[group.b_offset : group.b_offset + group.m]

    # -- routing ------------------------------------------------------------------------------------------------
    def gate(self, adapter_name: str, router_in: torch.Tensor) -> torch.Tensor:
        """Combine weights (..., E) for router inputs (..., d_in)."""
        config = self.ept_config[adapter_name]
        logits = self.ept_gate[adapter_name](router_in)
        if config.gate_form == "code":
            return reference_double_softmax(logits, config.top_k)
        return topk_softmax(logits, config.top_k, config.router_tau)

    def task_weights(self, adapter_name: str) -> torch.Tensor:
        """(num_tasks, E) combine weights of every task (task routing)."""
        return self.gate(adapter_name, self.ept_task_embedding[adapter_name])

    def _call_task_weights(self, adapter_name: str) -> torch.Tensor:
        """:meth:`task_weights`, taken from the call's plan (computed at route entry without autograd) where this
        forward needs no gradient either and the router is unchanged since."""
        if not torch.is_grad_enabled():
            entry = self.route.current().cache.get((self, adapter_name, "task_weights"))
            if entry is not None and self._unchanged(entry):
                return entry[2]
        return self.task_weights(adapter_name)

    def _route(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """Combine weights broadcastable to x's rows: (B, 1, .., 1, E) for task routing (one row for all when the
        call has one task), (..., E) per token."""
        config = self.ept_config[adapter_name]
        if config.router_input == "token":
            weights = self.gate(adapter_name, x)
            self.observe_routing(weights, self.task_ids_for(x, required=False))
            return weights
        ids = self.task_ids_for(x)
        if config.router_input == "task":
            table = self._call_task_weights(adapter_name)
            if self.route.observer is not None:
                self.observe_routing(table[ids], ids)
            rows = ids[:1] if self.route.current().uniform else ids
            return table[rows].view(rows.shape[0], *([1] * (x.dim() - 2)), -1)
        task_rows = self.ept_task_embedding[adapter_name][ids].view(ids.shape[0], *([1] * (x.dim() - 2)), -1)
        weights = self.gate(adapter_name, x + task_rows.to(x))
        self.observe_routing(weights, ids)
        return weights

    # -- factors ------------------------------------------------------------------------------------------------
    def _stacked_kernels(self, adapter_name: str, group: KernelGroup) -> torch.Tensor:
        """The group's kernels flattened, one row per expert (G, rows * k): a view where its experts are
        consecutive (the flat parameter holds kernels in expert order)."""
        first, count = group.experts[0], len(group.experts)
        if group.experts != tuple(range(first, first + count)):
            return torch.stack([self._kernel(adapter_name, e).reshape(-1) for e in group.experts])
        numel = experts.kernel_numel(self.out_features, group.k, self.ept_config[adapter_name].expert_form)
        start = self._plans[adapter_name][1][first]
        return self.ept_kernels[adapter_name][start : start + count * numel].view(count, numel)

    def _group_factors(self, adapter_name: str, seed, group: KernelGroup, kernel: torch.Tensor):
        """(up, down) LoRA factors of one group with a (possibly batched) kernel."""
        A, B = self._slice_seed(seed, group)
        form = self.ept_config[adapter_name].expert_form
        build = experts.kron2d_factors if form == "kron2d" else experts.code1d_factors
        return build(A, B, kernel, self.out_features, self.in_features)

    def task_lora_factors(self, adapter_name: str, task_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors (B, A) with B @ A = (alpha/r) * sum_e g_e(task) ΔW_e: the task's exact weight change."""
        capabilities = self.ept_config[adapter_name].capabilities()
        if not capabilities.mergeable:
            raise NotMergeableError(capabilities.reason)
        weights = self.task_weights(adapter_name)[task_id]
        ups, downs = self._fused_factors(adapter_name, weights)
        return self.scaling(adapter_name) * ups, downs

    def _active_groups(self, adapter_name: str, weights: torch.Tensor) -> list[KernelGroup]:
        """The groups with an expert that ``weights`` (E,) uses (one host sync; merging and export only)."""
        used = (weights.reshape(-1, weights.shape[-1]) != 0).any(dim=0).tolist()
        return [g for g in self._plans[adapter_name][0] if any(used[e] for e in g.experts)]

    def _fused_factors(self, adapter_name: str, weights: torch.Tensor):
        """One LoRA pair for one weight vector (E,): the used groups' factors concatenated along the rank (for
        merging and export; one host sync to find the used groups)."""
        seed = self._scaled_seed(adapter_name)
        groups = self._active_groups(adapter_name, weights)
        if adapter_name in self.ept_expert_order:
            weights = weights.index_select(-1, self.ept_expert_order[adapter_name])
        kernels = self._group_kernels(adapter_name, weights, groups)
        pairs = [self._group_factors(adapter_name, seed, group, kernel) for group, kernel in zip(groups, kernels)]
        return torch.cat([up for up, _ in pairs], dim=1), torch.cat([down for _, down in pairs], dim=0)

    def delta_weight(self, adapter_name: str, task_id: int) -> torch.Tensor:
        """Dense (alpha/r) sum_e g_e ΔW_e built literally, expert by expert, with transposed convolutions."""
        weights = self.task_weights(adapter_name)[task_id]
        return self.scaling(adapter_name) * self._literal_delta(adapter_name, weights)

    def _literal_delta(self, adapter_name: str, weights: torch.Tensor) -> torch.Tensor:
        config = self.ept_config[adapter_name]
        literal = experts.literal_kron2d if config.expert_form == "kron2d" else experts.literal_code1d
        groups, _ = self._plans[adapter_name]
        seed = self._scaled_seed(adapter_name)
        delta = self.ept_A[adapter_name].new_zeros(self.out_features, self.in_features)
        for group in groups:
            A, B = self._slice_seed(seed, group)
            for e in group.experts:
                if weights[e] != 0:
                    delta = delta + weights[e] * literal(B @ A, self._kernel(adapter_name, e), *delta.shape)
        return delta

    # -- forward ------------------------------------------------------------------------------------------------
    def _add_adapter_output(self, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        pyramid = self._decoding_pyramid(adapter_name, x)
        if pyramid is not None:  # a decoding step: the gathered pass this call built, its weights unchanged
            return pyramid.add_to(x, result)
        config = self.ept_config[adapter_name]
        by_task = None if config.materialize else self._tasks_by_rows(adapter_name, x)
        x, dropped = self._prepared_input(adapter_name, x)
        if config.materialize:
            change = self._materialized_output(adapter_name, dropped, self._route(adapter_name, x))
            return result + change.to(result.dtype)
        if by_task is not None:
            factors = self._call_factors(adapter_name, x, True, lambda _: self._task_factors(adapter_name, by_task))
            return self._add_rows_by_task(dropped, by_task, factors, result)
        factors = self._call_factors(
            adapter_name,
            x,
            False,
            lambda reused: self._route_factors(adapter_name, self._route(adapter_name, x), reused),
        )
        if isinstance(factors, experts.GatheredPyramid):
            return factors.add_to(dropped, result)
        return result + self._pyramid_output(adapter_name, dropped, factors).to(result.dtype)

    def _prepared_input(self, adapter_name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x in the adapter's dtype (recorded for the contrastive loss), and after dropout."""
        x = self._cast_input_dtype(x, self.ept_A[adapter_name].dtype)
        self.record_contrastive(adapter_name, x)
        dropout = self.ept_dropout[adapter_name]
        return x, (dropout(x) if dropout.training else x)  # in eval mode dropout is the identity

    def _decoding_pyramid(self, adapter_name: str, x: torch.Tensor) -> experts.GatheredPyramid | None:
        """For one token per row in eval mode without autograd (a decoding step), the gathered pass an earlier
        forward of this ``generate`` call built for these rows, while every tensor it derives from is unchanged:
        the step then skips the routing, the contrastive record (none without autograd) and dropout (the identity
        in eval mode)."""
        if self.training or torch.is_grad_enabled() or x.dim() < 2 or x.numel() != x.shape[0] * x.shape[-1]:
            return None
        entry = self.route.current().cache.get(self._factors_key(adapter_name, x, False))
        if entry is None or not isinstance(entry[2], experts.GatheredPyramid) or self.route.observer is not None:
            return None
        return entry[2] if self._unchanged(entry) and not torch.compiler.is_compiling() else None

    def _factors_key(self, adapter_name: str, x: torch.Tensor, by_task: bool) -> tuple:
        return (self, adapter_name, x.shape[0] if x.dim() > 1 else 1, by_task)

    @staticmethod
    def _unchanged(entry) -> bool:
        return all(t._version == version for t, version in zip(entry[0], entry[1]))

    def _call_factors(self, adapter_name: str, x: torch.Tensor, by_task: bool, build):
        """``build(reused)``'s factors. Where a call reuses them (the decoding steps of a ``generate`` call, without
        autograd) they are kept in the call's cache with the version of every tensor they derive from, and rebuilt
        when one has changed in place (an optimizer step, ``load_state_dict``), so a changed weight is seen at the
        next step."""
        call = self.route.current()
        if not call.generating or self.ept_config[adapter_name].router_input != "task" or torch.is_grad_enabled():
            return build(False)
        if torch.compiler.is_compiling() or self.route.observer is not None:  # an observer sees every forward
            return build(False)
        key = self._factors_key(adapter_name, x, by_task)
        entry = call.cache.get(key)
        if entry is not None and self._unchanged(entry):
            return entry[2]
        tensors = self._route_inputs(adapter_name)
        versions = [t._version for t in tensors]  # before building: what the factors were built from
        factors = build(True)
        call.cache[key] = (tensors, versions, factors)
        return factors

    # -- rows grouped by task ------------------------------------------------------------------------------------
    def _tasks_by_rows(self, adapter_name: str, x: torch.Tensor) -> dict[int, tuple[int, ...]] | None:
        """The call's tasks and the groups each uses, where every task's rows run through that task's own factors
        (kernels folded in, only its top-k groups: rank r times their kernel sizes, instead of r times those of
        every group the call uses, plus a mixing product per row). That pays where a task has enough tokens for
        the products, not their number, to set the cost; else (decoding steps, one task, an observer listening,
        routing unknown at entry) None."""
        by_task = self._planned(adapter_name, "task_groups")
        if by_task is None or len(by_task) < 2 or x.dim() < 2 or self.route.observer is not None:
            return None
        return by_task if x.numel() // x.shape[-1] >= TOKENS_PER_TASK * len(by_task) else None

    def _task_factors(self, adapter_name: str, by_task: dict[int, tuple[int, ...]]) -> list[list[tuple]]:
        """Per task in ``by_task``, its groups' (down, up, kernel): kron2d groups share ``down = A_g ⊗ I_k`` (an
        :class:`experts.KronDown`) and ``up = B_g ⊗ I_k`` among the tasks and apply the task's combined kernel
        (scale included) to the hidden states in between (``(I_r ⊗ K) h``, r k² per token), so no factor is built
        per task; code1d folds the task's kernel into its rank-r ``up``."""
        groups = self._plans[adapter_name][0]
        seed = self._scaled_seed(adapter_name)
        table = self.scaling(adapter_name) * self._call_task_weights(adapter_name)  # the scale rides on the kernels
        if adapter_name in self.ept_expert_order:
            table = table.index_select(-1, self.ept_expert_order[adapter_name])
        used = sorted({i for chosen in by_task.values() for i in chosen})
        kernels = dict(zip(used, self._group_kernels(adapter_name, table, [groups[i] for i in used])))  # every task
        if self.ept_config[adapter_name].expert_form == "kron2d":
            shared = {}
            for i in used:
                A, B = self._slice_seed(seed, groups[i])
                eye = experts.identity(groups[i].k, B.dtype, B.device)
                down = experts.KronDown(A, groups[i].k, self.in_features)
                shared[i] = (down, experts.kron2d_up(B, eye, self.out_features))
            return [[(*shared[i], kernels[i][task]) for i in chosen] for task, chosen in by_task.items()]
        factors = []
        for task, chosen in by_task.items():
            pairs = [self._group_factors(adapter_name, seed, groups[i], kernels[i][task]) for i in chosen]
            factors.append([(down, up, None) for up, down in pairs])
        return factors

    def _add_rows_by_task(self, x: torch.Tensor, by_task: dict[int, tuple[int, ...]], factors, result):
        """``result`` plus each task's rows through its factors. Rows are sorted by task unless they come so. Without
        autograd, in one dtype and in task order, the products add into ``result`` itself; else each task's change
        is built apart and the whole added once (in-place adds into views would cost autograd a copy of the whole
        output each)."""
        call = self.route.current()
        ids = self.task_ids_for(x)
        repeats = ids.shape[0] // call.ids.shape[0]  # rows per example (beams) inside generate
        tokens = x[0].numel() // x.shape[-1]
        counts = [call.cache[_TASK_COUNTS][task] * repeats * tokens for task in by_task]
        order = None if call.cache[_IN_TASK_ORDER] else torch.argsort(ids, stable=True)  # None: already in order
        blocks = (x if order is None else x.index_select(0, order)).reshape(-1, x.shape[-1]).split(counts)
        if order is None and result.dtype == x.dtype and not torch.is_grad_enabled():
            for out, block, task_factors in zip(result.view(-1, result.shape[-1]).split(counts), blocks, factors):
                for down, up, kernel in task_factors:
                    out.addmm_(_task_hidden(block, down, kernel), up.mT)
            return result
        changes = []
        for block, task_factors in zip(blocks, factors):
            change = block.new_zeros(block.shape[0], self.out_features)
            for down, up, kernel in task_factors:
                change = torch.addmm(change, _task_hidden(block, down, kernel), up.mT)
            changes.append(change)
        change = torch.cat(changes).view(*x.shape[:-1], -1)
        if order is not None:
            change = change.index_select(0, torch.argsort(order))
        return result + change.to(result.dtype)

    def _pyramid_output(self, adapter_name: str, x: torch.Tensor, factors) -> torch.Tensor:
        """The used groups' experts on ``x`` with their (shared, per-row or per-token) combined kernels."""
        down, up, mix = factors
        if mix is None:  # one route: kernels folded into ``up``
            return F.linear(F.linear(x, down), up)
        if self.ept_config[adapter_name].expert_form == "code1d":  # rank r per group: each group on its own
            seed = self._scaled_seed(adapter_name)
            parts = [
                experts.code1d_apply(x, *self._slice_seed(seed, group), kernel, self.out_features)
                for group, kernel in zip(self._call_groups(adapter_name), mix)
            ]
            return torch.stack(parts).sum(dim=0)
        return F.linear(self._mix_hidden(adapter_name, F.linear(x, down), mix), up)

    def _mix_hidden(self, adapter_name: str, hidden: torch.Tensor, kernels: list[torch.Tensor]) -> torch.Tensor:
        """``(I_r ⊗ K) h`` for each group's slice of the hidden states, with its rows' kernels."""
        r, parts, start = self.ept_config[adapter_name].r, [], 0
        for kernel in kernels:
            k = kernel.shape[-1]
            group = hidden[..., start : start + r * k].unflatten(-1, (r, k))
            parts.append(experts.row_kernels(group, kernel).flatten(-2))
            start += r * k
        return torch.cat(parts, dim=-1)

    def _route_factors(self, adapter_name: str, weights: torch.Tensor, reused: bool = False):
        """(down, up, mix) of the call's used groups for these combine weights, scale (alpha / r) included in the
        kernels: ``mix`` is ``None`` where one route serves every row (kernels folded into ``up``), else each
        group's kernels per row or token. For factors ``reused`` by many decoding steps (kron2d, one route per
        row), an :class:`experts.GatheredPyramid` instead, which runs every group from the whole seed and per-row
        block-diagonal kernels: a decoding step then reads the seed, not factors of rank r times the kernel sizes,
        in a few operations.
        """
        groups = self._call_groups(adapter_name)
        seed = self._scaled_seed(adapter_name)
        weights = self.scaling(adapter_name) * weights  # alpha / r on the (small) kernels, not on every output
        if adapter_name in self.ept_expert_order:
            weights = weights.index_select(-1, self.ept_expert_order[adapter_name])
        kernels = self._group_kernels(adapter_name, weights, groups)
        shared = weights.shape[:-1].numel() == 1
        if shared:
            kernels = [kernel.reshape(kernel.shape[-2:]) for kernel in kernels]
        if not shared and self.ept_config[adapter_name].expert_form == "code1d":
            factors = (None, None, kernels)
        elif not shared and reused and all(k.shape[:-2].numel() == weights.shape[0] for k in kernels):
            layout = tuple((g.k, g.a_offset, g.n, g.b_offset, g.m) for g in groups)
            mix = experts.block_diagonal([K.reshape(-1, *K.shape[-2:]) for K in kernels])
            steps = self.route.current().cache.setdefault(_GATHERED_STEPS, {})  # shared by the call's layers
            factors = experts.GatheredPyramid(*seed, mix, layout, self.in_features, self.out_features, steps)
        else:
            pairs = [
                self._group_factors(
                    adapter_name,
                    seed,
                    group,
                    kernel if shared else experts.identity(kernel.shape[-1], kernel.dtype, kernel.device),
                )
                for group, kernel in zip(groups, kernels)
            ]
            mix = None if shared else kernels
            factors = (torch.cat([down for _, down in pairs], dim=0), torch.cat([up for up, _ in pairs], dim=1), mix)
        return factors

    def _group_kernels(self, adapter_name: str, weights: torch.Tensor, groups: list[KernelGroup]):
        """Each of ``groups``' combined kernels (..., rows, k) for weights (..., E) whose experts are in group order:
        one product of the weights with the block-diagonal matrix of every group's stacked kernels."""
        every_group = self._plans[adapter_name][0]
        stacked = [self._stacked_kernels(adapter_name, group) for group in every_group]
        combined = weights @ torch.block_diag(*stacked).to(weights)  # (..., sum of the groups' kernel sizes)
        kernels, start, wanted = {}, 0, {id(group) for group in groups}
        for group, block in zip(every_group, stacked):
            if id(group) in wanted:
                kernels[id(group)] = combined[..., start : start + block.shape[1]].unflatten(-1, (-1, group.k))
            start += block.shape[1]
        return [kernels[id(group)] for group in groups]

    def _call_groups(self, adapter_name: str) -> list[KernelGroup]:
        """The groups this call's tasks use (found at route entry), or every group where that is unknown."""
        groups = self._plans[adapter_name][0]
        used = self._planned(adapter_name, "groups") if self.route is not None else None
        return groups if used is None else [groups[i] for i in used]

    def _planned(self, adapter_name: str, what: str):
        """The call's plan ``what`` ("groups", "task_groups") for this adapter, or None where there is none. Where
        the router has changed in place since route entry (an optimizer step during a ``generate`` call), the top-k
        it picks may have too: the layer plans again, its one host synchronisation after such a change."""
        call = self.route.current()
        entry = call.cache.get((self, adapter_name, "task_weights"))
        if entry is not None and not torch.compiler.is_compiling() and not self._unchanged(entry):
            with torch.no_grad():
                table = self._plan_task_weights(call, adapter_name)
            self._accept_groups(call, adapter_name, (table != 0).reshape(-1).tolist())
        return call.cache.get((self, adapter_name, what))

    def plan_request(self, call) -> torch.Tensor | None:
        """Which experts each task uses, per task-routed adapter ((num_tasks * E,) booleans each) whose router
        changed since the last plan (else known on the host); the first layer asked also fetches the call's
        rows per task, which every layer reads."""
        adapters = self._planned_adapters()
        if not adapters or any(isinstance(self.ept_task_embedding[a], DTensor) for a in adapters):
            return None  # sharded (FSDP): every group runs
        asked = [(self._plan_task_weights(call, a) != 0).reshape(-1) for a in adapters if not self._reuse_plan(call, a)]
        if _TASK_COUNTS not in call.cache:
            call.cache[_TASK_COUNTS] = self  # filled in by this layer's accept_plan, the first one called
            in_task_order = (call.ids[1:] >= call.ids[:-1]).all().reshape(1)  # then rows need no reordering
            asked[:0] = [torch.bincount(call.ids, minlength=self.route.num_tasks), in_task_order]
        return torch.cat(asked) if asked else call.ids.new_zeros(0)

    def _reuse_plan(self, call, adapter_name: str) -> bool:
        """Whether the last plan still holds (the router's tensors the same, unchanged in place and not moved): then
        it serves this call too, and the call keeps it (another thread's call may replace the layer's meanwhile)."""
        known = self._known_routes.get(adapter_name)
        router = self._router_inputs(adapter_name)
        if (
            known is None
            or known.fingerprint != _fingerprint(router)
            or any(map(operator.is_not, known.router, router))
        ):
            return False
        self._keep_task_weights(call, adapter_name, router, known.table)
        call.cache[(self, adapter_name, "known_route")] = known
        return True

    def _plan_task_weights(self, call, adapter_name: str) -> torch.Tensor:
        """Every task's combine weights, kept in the call's cache with the router's versions they were made from."""
        router = self._router_inputs(adapter_name)
        table = self.task_weights(adapter_name)
        self._keep_task_weights(call, adapter_name, router, table)
        return table

    def _keep_task_weights(self, call, adapter_name: str, router: list[torch.Tensor], table: torch.Tensor) -> None:
        """The call's task-weight table with the versions of the router's tensors it was made from (what
        :meth:`_unchanged` checks)."""
        call.cache[(self, adapter_name, "task_weights")] = (router, [t._version for t in router], table)

    def accept_plan(self, call, values: list) -> None:
        if call.cache[_TASK_COUNTS] is self:
            tasks = self.route.num_tasks
            call.cache[_TASK_COUNTS], call.cache[_IN_TASK_ORDER] = values[:tasks], bool(values[tasks])
            values = values[tasks + 1 :]
        start = 0
        for adapter_name in self._planned_adapters():
            known = call.cache.get((self, adapter_name, "known_route"))
            if known is None:  # fetched for this call: known from now on
                router, _, table = call.cache[(self, adapter_name, "task_weights")]
                config = self.ept_config[adapter_name]
                size = config.num_tasks * len(config.kernel_sizes)
                used = values[start : start + size]
                known = self._known_routes[adapter_name] = _KnownRoute(router, _fingerprint(router), table, used)
                start += size
            self._accept_groups(call, adapter_name, known.used)

    def _accept_groups(self, call, adapter_name: str, used: list) -> None:
        """The groups each of the call's tasks uses and their union, from which experts each task uses (host
        values, task-major)."""
        experts_per_task = len(self.ept_config[adapter_name].kernel_sizes)
        groups = self._plans[adapter_name][0]
        tasks = [task for task, count in enumerate(call.cache[_TASK_COUNTS]) if count]
        by_task = {
            task: tuple(
                i for i, group in enumerate(groups) if any(used[task * experts_per_task + e] for e in group.experts)
            )
            for task in tasks
        }
        call.cache[(self, adapter_name, "task_groups")] = by_task
        call.cache[(self, adapter_name, "groups")] = tuple(sorted({i for chosen in by_task.values() for i in chosen}))

    def _planned_adapters(self) -> list[str]:
        return [a for a in self._active_for_forward() if self.ept_config[a].router_input == "task"]

    def _route_inputs(self, adapter_name: str) -> list[torch.Tensor]:
        seed_and_kernels = [self.ept_A[adapter_name], self.ept_B[adapter_name], self.ept_kernels[adapter_name]]
        return seed_and_kernels + self._router_inputs(adapter_name)

    def _router_inputs(self, adapter_name: str) -> list[torch.Tensor]:
        gate = self.ept_gate[adapter_name]
        return [self.ept_task_embedding[adapter_name], gate.weight, gate.bias]

    def _materialized_output(self, adapter_name: str, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        rows = weights.reshape(-1, weights.shape[-1])
        if not bool((rows == rows[0]).all()):
            raise ValueError("materialize=True supports one route per batch; use task-homogeneous batches.")
        return self.scaling(adapter_name) * F.linear(x, self._literal_delta(adapter_name, rows[0]))


class Linear(AdaptedLinear, EptLayer):
    """An ``nn.Linear`` adapted with EPT."""


class _KnownRoute(NamedTuple):
    """A plan kept for later calls: the router's tensors, their :func:`_fingerprint`, the task-weight table made
    from them and which experts each task uses (host booleans, task-major)."""

    router: list[torch.Tensor]
    fingerprint: list[tuple]
    table: torch.Tensor
    used: list


def _fingerprint(tensors: list[torch.Tensor]) -> list[tuple]:
    """What tells a tensor changed since: its in-place version, and its storage (``model.to()`` swaps it)."""
    return [(t._version, t.data_ptr(), t.dtype) for t in tensors]


def _task_hidden(block: torch.Tensor, down, kernel: torch.Tensor | None) -> torch.Tensor:
    """A task's hidden states ``down x`` for its rows (tokens, r * k), through ``(I_r ⊗ K)``: each rank component's k
    values mixed by the task's kernel (kron2d; code1d has its kernel in ``up``). ``down`` is a factor or applies one
    (:class:`experts.KronDown`)."""
    hidden = down(block) if callable(down) else F.linear(block, down)
    if kernel is None:
        return hidden
    return torch.matmul(hidden.view(block.shape[0], -1, kernel.shape[-1]), kernel.mT).view(block.shape[0], -1)
