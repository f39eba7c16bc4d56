"""The EPT layer: a frozen linear plus a routed pyramid of deconvolution experts over one shared seed.

Forward, for an input row x of task t (arXiv 2603.12577, eq. 4):

    y = W0 x + b0 + (alpha / r) * sum_e g_e(t) ΔW_e dropout(x)

Experts are grouped by kernel size: same-size experts share their seed slice, so a group costs one pass with
the gate-weighted sum of its kernels. All active groups run as one LoRA-shaped pair of matrix products whose
rank is r times the sum of the group kernel sizes (``experts.py``); the d_out x d_in matrix is never built.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...gating import reference_double_softmax, topk_softmax
from ..base import AdaptedLinear, NotMergeableError
from ..task_contrastive import TaskContrastiveLayer
from . import experts
from .config import EptConfig
from .pyramid import KernelGroup, alp_scales, plan_groups


class EptLayer(TaskContrastiveLayer):
    adapter_layer_names = ("ept_A", "ept_B", "ept_kernels", "ept_gate", "ept_task_embedding")
    other_param_names = ("ept_config", "ept_contrastive")
    parameter_groups = {"ept_gate": "router", "ept_task_embedding": "task_embedding"}
    adapter_state_names = ("_plans",)

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
        self._plans: dict[str, tuple] = {}

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
        self._plans[adapter_name] = (groups, offsets, alp_scales(config, groups, m_total, n_total))
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
        self.set_adapter(self.active_adapters)

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
        _, offsets, _ = self._plans[adapter_name]
        rows = k if config.expert_form == "kron2d" else self.out_features // k
        flat = self.ept_kernels[adapter_name]
        return flat[offsets[expert] : offsets[expert] + rows * k].view(rows, k)

    def _scaled_seed(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole seed factors (A, B) with the dimension-aware scaling applied (once per forward)."""
        A, B = self.ept_A[adapter_name], self.ept_B[adapter_name]
        scales = self._plans[adapter_name][2]
        if scales is None:
            return A, B
        a_rows, a_cols, b_rows = scales
        if a_rows is not None:
            return A * a_rows.to(A)[:, None], B
        return A * a_cols.to(A)[None, :], B * b_rows.to(B)[:, None]

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

    def _route(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """Combine weights broadcastable to x's rows: (B, 1, .., 1, E) for task routing, (..., E) per token."""
        config = self.ept_config[adapter_name]
        if config.router_input == "token":
            weights = self.gate(adapter_name, x)
            self.observe_routing(weights, self.task_ids_for(x, required=False))
            return weights
        ids = self.task_ids_for(x)
        if config.router_input == "task":
            weights = self.task_weights(adapter_name)[ids]
            self.observe_routing(weights, ids)
            return weights.view(ids.shape[0], *([1] * (x.dim() - 2)), -1)
        task_rows = self.ept_task_embedding[adapter_name][ids].view(ids.shape[0], *([1] * (x.dim() - 2)), -1)
        weights = self.gate(adapter_name, x + task_rows.to(x))
        self.observe_routing(weights, ids)
        return weights

    # -- factors ------------------------------------------------------------------------------------------------
    def _group_kernel(self, adapter_name: str, group: KernelGroup, weights: torch.Tensor) -> torch.Tensor:
        """Gate-weighted sum of the group's kernels; per-row weights (..., E) give kernels (..., rows, k)."""
        stacked = torch.stack([self._kernel(adapter_name, e) for e in group.experts])  # (G, rows, k)
        return torch.einsum("...g,gij->...ij", weights[..., list(group.experts)], stacked.to(weights))

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
        """The groups with an expert that any row of ``weights`` (..., E) uses (one host sync)."""
        used = (weights.reshape(-1, weights.shape[-1]) != 0).any(dim=0).tolist()
        return [g for g in self._plans[adapter_name][0] if any(used[e] for e in g.experts)]

    def _fused_factors(self, adapter_name: str, weights: torch.Tensor):
        """One LoRA pair for one weight vector (E,): the used groups' factors concatenated along the rank.

        Rebuilt every call: it costs about 1-2% of a 2048-token forward of the layer (measured at 384x384 to
        384x1536), so no cache keyed on parameter versions is kept.
        """
        seed = self._scaled_seed(adapter_name)
        pairs = [
            self._group_factors(adapter_name, seed, group, self._group_kernel(adapter_name, group, weights))
            for group in self._active_groups(adapter_name, weights)
        ]
        return torch.cat([up for up, _ in pairs], dim=1), torch.cat([down for _, down in pairs], dim=0)

    def delta_weight(self, adapter_name: str, task_id: int) -> torch.Tensor:
        """Dense (alpha/r) sum_e g_e ΔW_e built literally, expert by expert, with transposed convolutions."""
        weights = self.task_weights(adapter_name)[task_id]
        return self.scaling(adapter_name) * self._literal_delta(adapter_name, weights)

    def _literal_delta(self, adapter_name: str, weights: torch.Tensor) -> torch.Tensor:
        config = self.ept_config[adapter_name]
        literal = experts.literal_kron2d if config.expert_form == "kron2d" else experts.literal_code1d
        groups, _, _ = self._plans[adapter_name]
        seed = self._scaled_seed(adapter_name)
        delta = self.ept_A[adapter_name].new_zeros(self.out_features, self.in_features)
        for group in groups:
            A, B = self._slice_seed(seed, group)
            for e in group.experts:
                if weights[e] != 0:
                    delta = delta + weights[e] * literal(B @ A, self._kernel(adapter_name, e), *delta.shape)
        return delta

    # -- forward ------------------------------------------------------------------------------------------------
    def _adapter_output(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        config = self.ept_config[adapter_name]
        x = self._cast_input_dtype(x, self.ept_A[adapter_name].dtype)
        weights = self._route(adapter_name, x)
        self.record_contrastive(adapter_name, x)
        dropped = self.ept_dropout[adapter_name](x)
        if config.materialize:
            return self._materialized_output(adapter_name, dropped, weights)
        if weights.shape[:-1].numel() == 1 or bool((weights == weights.reshape(-1, weights.shape[-1])[0]).all()):
            up, down = self._fused_factors(adapter_name, weights.reshape(-1, weights.shape[-1])[0])
            return self.scaling(adapter_name) * F.linear(F.linear(dropped, down), up)
        return self.scaling(adapter_name) * self._mixed_output(adapter_name, dropped, weights)

    def _mixed_output(self, adapter_name: str, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Rows with different combine weights (mixed tasks, token routing): per-row kernels between the factors."""
        config = self.ept_config[adapter_name]
        seed = self._scaled_seed(adapter_name)
        out = None
        for group in self._active_groups(adapter_name, weights):
            kernel = self._group_kernel(adapter_name, group, weights)
            A, B = self._slice_seed(seed, group)
            if config.expert_form == "kron2d":
                eye = experts.identity(group.k, A.dtype, A.device)
                up, down = experts.kron2d_factors(A, B, eye, self.out_features, self.in_features)
                hidden = F.linear(x, down).unflatten(-1, (config.r, group.k))  # (..., r, k)
                part = F.linear(torch.matmul(hidden, kernel.transpose(-1, -2)).flatten(-2), up)
            else:
                seed_out = F.linear(F.linear(x[..., : group.n], A), B)  # (..., m)
                part = (seed_out[..., None] * kernel).flatten(-2)
                part = F.pad(part, (0, self.out_features - part.shape[-1]))
            out = part if out is None else out + part
        return out

    def _materialized_output(self, adapter_name: str, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        rows = weights.reshape(-1, weights.shape[-1])
        if not bool((rows == rows[0]).all()):
            raise ValueError("materialize=True supports one route per batch; use task-homogeneous batches.")
        return self.scaling(adapter_name) * F.linear(x, self._literal_delta(adapter_name, rows[0]))


class Linear(AdaptedLinear, EptLayer):
    """An ``nn.Linear`` adapted with EPT."""
