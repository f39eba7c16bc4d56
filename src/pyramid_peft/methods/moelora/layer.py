"""The MOELoRA layer: a frozen linear plus a task-gated dense mixture of LoRA experts.

Forward, for an input row x of task t (MOELoRA, arXiv 2310.18339):

    w(t) = softmax(W_g e_t)                               e_t: row t of this layer's task-embedding table
    y    = W0 x + b0 + (alpha / r) * sum_i w_i(t) B_i A_i dropout(x)

Expert i has rank q = r / E. The experts are stored stacked along the rank (``methods/mixture.py``), and the
gate is evaluated once per forward for all tasks, then indexed by each example's task id.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..base import AdaptedLinear, RoutedLayer
from ..mixture import fold_weights, mix_pieces
from .config import MoeLoraConfig


class MoeLoraLayer(RoutedLayer):
    adapter_layer_names = ("moelora_A", "moelora_B", "moelora_gate", "moelora_task_embedding")
    other_param_names = ("moelora_config",)
    parameter_groups = {"moelora_gate": "router", "moelora_task_embedding": "task_embedding"}

    def __init__(self, base_layer: nn.Module, route):
        super().__init__(base_layer, route)
        self.moelora_A = nn.ParameterDict()  # (r, d_in): [A_1; ...; A_E]
        self.moelora_B = nn.ParameterDict()  # (d_out, r): [B_1 ... B_E]
        self.moelora_gate = nn.ModuleDict()  # Linear(task_embedding_dim -> E, bias=False)
        self.moelora_task_embedding = nn.ParameterDict()  # (num_tasks, task_embedding_dim)
        self.moelora_dropout = nn.ModuleDict()
        self.moelora_config: dict[str, MoeLoraConfig] = {}

    def update_layer(self, adapter_name: str, config: MoeLoraConfig) -> None:
        self.moelora_config[adapter_name] = config
        self.moelora_A[adapter_name] = nn.Parameter(torch.empty(config.r, self.in_features))
        self.moelora_B[adapter_name] = nn.Parameter(torch.empty(self.out_features, config.r))
        self.moelora_gate[adapter_name] = nn.Linear(config.task_embedding_dim, config.num_experts, bias=False)
        self.moelora_task_embedding[adapter_name] = nn.Parameter(
            torch.empty(config.num_tasks, config.task_embedding_dim)
        )
        self.add_dropout(adapter_name, config.lora_dropout)
        self.reset_parameters(adapter_name)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def reset_parameters(self, adapter_name: str) -> None:
        """As the official code: A ~ N(0, 0.01^2), B = 0, embeddings ~ N(0, 1) and the gate's default init
        (nn.Embedding's and nn.Linear's), so the mixture starts non-uniform but ΔW = 0."""
        with torch.no_grad():
            nn.init.normal_(self.moelora_A[adapter_name], std=0.01)
            nn.init.zeros_(self.moelora_B[adapter_name])
            nn.init.normal_(self.moelora_task_embedding[adapter_name])
            self.moelora_gate[adapter_name].reset_parameters()

    def task_weights(self, adapter_name: str) -> torch.Tensor:
        """(num_tasks, E) expert weights of every task: softmax(W_g e_t) row by row."""
        logits = self.moelora_gate[adapter_name](self.moelora_task_embedding[adapter_name])
        return torch.softmax(logits, dim=-1)

    def _adapter_output(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        config = self.moelora_config[adapter_name]
        A = self.moelora_A[adapter_name]
        x = self._cast_input_dtype(x, A.dtype)
        ids = self.task_ids_for(x)
        weights = self.task_weights(adapter_name)[ids]
        self.observe_routing(weights, ids)
        # one weight vector per example, broadcast over its positions: (batch, 1, ..., 1, E)
        weights = weights.view(ids.shape[0], *([1] * (x.dim() - 2)), -1)
        hidden = F.linear(self.moelora_dropout[adapter_name](x), A).unflatten(-1, (config.num_experts, -1))
        return self.scaling(adapter_name) * mix_pieces(hidden, weights, self.moelora_B[adapter_name])

    def task_lora_factors(self, adapter_name: str, task_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B', A) with B' A = (alpha/r) sum_i w_i(task) B_i A_i: the task's exact weight change, rank r."""
        up = fold_weights(self.moelora_B[adapter_name], self.task_weights(adapter_name)[task_id])
        return self.scaling(adapter_name) * up, self.moelora_A[adapter_name]


class Linear(AdaptedLinear, MoeLoraLayer):
    """An ``nn.Linear`` adapted with MOELoRA."""
