"""The MoRE layer: a frozen linear plus one LoRA whose nested ranks are experts, picked per task.

Forward, for an input row x of task t (MoRE, arXiv 2505.22694):

    p(t) = softmax(W_g e_t + b_g)                    (E experts; e_t = this module's task embedding)
    c(t) = argmax p(t),  ρ = rank of expert c(t)
    y    = W0 x + b0 + (alpha / r) * π(t) * B_s[:, :ρ] A_s[:ρ, :] dropout(x)

with ``A_s = diag(s) A`` and ``B_s = B diag(s)``, ``s_ρ = ρ / r`` (or 1 without ``rank_scale``). ``π(t)`` is the
straight-through one-hot entry of the chosen expert: 1 in the forward pass, with the gradient of ``p_c(t)`` in the
backward pass, so the selector learns (``route_mode="intended"``). In ``"reference"`` mode ``c(t)`` is frozen at
its first forward and ``π = 1`` carries no gradient, as in the released code.

Rows of different tasks differ only in how many rank components they keep, so a mixed batch runs as one LoRA of
rank r with a per-row mask over the rank components.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from ...routing import in_backward_pass
from ..base import AdaptedLinear
from ..task_contrastive import TaskContrastiveLayer
from .config import MoreConfig

UNSET = -1  # route-map entry of a task whose expert is not frozen yet (reference mode)


class MoreLayer(TaskContrastiveLayer):
    adapter_layer_names = ("more_A", "more_B", "more_gate", "more_task_embedding")
    other_param_names = ("more_config", "more_contrastive", "more_route_map")
    parameter_groups = {"more_gate": "router", "more_task_embedding": "task_embedding"}

    def __init__(self, base_layer: nn.Module, route):
        super().__init__(base_layer, route)
        self.more_A = nn.ParameterDict()
        self.more_B = nn.ParameterDict()
        self.more_gate = nn.ModuleDict()
        self.more_task_embedding = nn.ParameterDict()
        self.more_dropout = nn.ModuleDict()
        # Reference mode only: the expert each task was frozen to, saved with the adapter so a reload keeps it.
        self.more_route_map = BufferDict(persistent=True)
        self.more_config: dict[str, MoreConfig] = {}
        self.more_contrastive: dict[str, bool] = {}

    # -- construction -------------------------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: MoreConfig) -> None:
        d_out, d_in = self.out_features, self.in_features
        self.more_config[adapter_name] = config
        self.more_contrastive.setdefault(adapter_name, config.contrastive_weight > 0)
        self.more_A[adapter_name] = nn.Parameter(torch.empty(config.r, d_in))
        self.more_B[adapter_name] = nn.Parameter(torch.empty(d_out, config.r))
        self.more_gate[adapter_name] = nn.Linear(d_in, config.num_experts, bias=True)
        self.more_task_embedding[adapter_name] = nn.Parameter(torch.empty(config.num_tasks, d_in))
        self.add_dropout(adapter_name, config.lora_dropout)
        if config.route_mode == "reference":
            self.more_route_map[adapter_name] = torch.full((config.num_tasks,), UNSET, dtype=torch.long)
        self.reset_parameters(adapter_name)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def reset_parameters(self, adapter_name: str) -> None:
        """LoRA init (A Kaiming-uniform, B zero), task embeddings N(0, 0.01²), the gate as nn.Linear's default."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.more_A[adapter_name], a=math.sqrt(5))
            nn.init.zeros_(self.more_B[adapter_name])
            nn.init.normal_(self.more_task_embedding[adapter_name], std=0.01)
            self.more_gate[adapter_name].reset_parameters()
            if adapter_name in self.more_route_map:
                self.more_route_map[adapter_name].fill_(UNSET)

    # -- factors ------------------------------------------------------------------------------------------------

    def scaled_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_s, B_s): rank component ρ of both factors scaled by s_ρ = ρ/r (unscaled without ``rank_scale``)."""
        config = self.more_config[adapter_name]
        A, B = self.more_A[adapter_name], self.more_B[adapter_name]
        if not config.rank_scale:
            return A, B
        s = torch.arange(1, config.r + 1, dtype=A.dtype, device=A.device) / config.r
        return A * s[:, None], B * s[None, :]

    def expert_ranks(self, adapter_name: str, device: torch.device) -> torch.Tensor:
        return torch.tensor(self.more_config[adapter_name].expert_ranks, device=device)

    # -- routing ------------------------------------------------------------------------------------------------
    def task_probs(self, adapter_name: str) -> torch.Tensor:
        """(num_tasks, E) selector probabilities softmax(W_g e_t + b_g) of every task."""
        return torch.softmax(self.more_gate[adapter_name](self.more_task_embedding[adapter_name]), dim=-1)

    def task_choices(self, adapter_name: str) -> torch.Tensor:
        """(num_tasks,) expert index of every task now: the argmax, or in reference mode the frozen pick where set."""
        with torch.no_grad():
            choice = self.task_probs(adapter_name).argmax(dim=-1)
        if adapter_name not in self.more_route_map:
            return choice
        frozen = self.more_route_map[adapter_name]
        return torch.where(frozen == UNSET, choice, frozen)

    def _route(self, adapter_name: str, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Expert index of each row and its straight-through factor (value 1; ``None`` in reference mode)."""
        if adapter_name in self.more_route_map:
            return self._frozen_route(adapter_name, ids)[ids], None
        probs = self.task_probs(adapter_name)
        choice = probs.argmax(dim=-1)
        picked = probs.gather(-1, choice[:, None]).squeeze(-1)
        # The chosen entry of one_hot(c) + p - p.detach(): exactly 1 forward, d p_c backward.
        straight_through = picked - picked.detach() + 1.0
        return choice[ids], straight_through[ids]

    def _frozen_route(self, adapter_name: str, ids: torch.Tensor) -> torch.Tensor:
        """Reference mode: freeze the argmax of every task seen for the first time, then always use the map."""
        frozen = self.more_route_map[adapter_name]
        new = ids[frozen[ids] == UNSET].unique()
        if new.numel() and not in_backward_pass():
            with torch.no_grad():
                frozen[new] = self.task_probs(adapter_name)[new].argmax(dim=-1)
        return frozen

    def task_lora_factors(self, adapter_name: str, task_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors (B, A) with B @ A = (alpha/r) B_s[:, :ρ] A_s[:ρ]: the task's exact weight change (π = 1)."""
        rank = self.more_config[adapter_name].expert_ranks[int(self.task_choices(adapter_name)[task_id])]
        A_s, B_s = self.scaled_factors(adapter_name)
        return self.scaling(adapter_name) * B_s[:, :rank], A_s[:rank]

    # -- forward ------------------------------------------------------------------------------------------------
    def _adapter_output(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        A_s, B_s = self.scaled_factors(adapter_name)
        x = self._cast_input_dtype(x, A_s.dtype)
        ids = self.task_ids_for(x)
        choice, straight_through = self._route(adapter_name, ids)
        self.observe_routing(F.one_hot(choice, self.more_config[adapter_name].num_experts).to(A_s.dtype), ids)
        self.record_contrastive(adapter_name, x, ids)
        # Keep rank components [0, ρ(row)) of each row: mask (rows, r), broadcast over the sequence axes.
        ranks = self.expert_ranks(adapter_name, x.device)[choice]
        keep = (torch.arange(A_s.shape[0], device=x.device)[None, :] < ranks[:, None]).to(A_s.dtype)
        if straight_through is not None:
            keep = keep * straight_through[:, None]
        keep = keep.view(ids.shape[0], *([1] * (x.dim() - 2)), -1)
        hidden = F.linear(self.more_dropout[adapter_name](x), A_s) * keep
        return self.scaling(adapter_name) * F.linear(hidden, B_s)


class Linear(AdaptedLinear, MoreLayer):
    """An ``nn.Linear`` adapted with MoRE."""
