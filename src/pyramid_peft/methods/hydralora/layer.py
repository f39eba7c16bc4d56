"""The HydraLoRA layer: a frozen linear plus one shared A and N B heads mixed per token by a router.

Forward, for every token x (HydraLoRA, arXiv 2404.19245):

    g(x) = softmax(W_r x)                                 W_r: Linear(d_in -> N, bias=False)
    y    = W0 x + b0 + (alpha / r) * sum_i g_i(x) B_i A dropout(x)

The heads are stored side by side, B = [B_1 ... B_N] (d_out x N*r), so the shared projection A x is computed
once and the heads are applied as one matrix product over the router-weighted copies (``multilora/mixture.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..base import AdaptedLinear, RoutedLayer
from ..mixture import mix_pieces
from .config import HydraLoraConfig


class HydraLoraLayer(RoutedLayer):
    adapter_layer_names = ("hydralora_A", "hydralora_B", "hydralora_router")
    other_param_names = ("hydralora_config",)
    parameter_groups = {"hydralora_router": "router"}

    def __init__(self, base_layer: nn.Module, route):
        super().__init__(base_layer, route)
        self.hydralora_A = nn.ParameterDict()  # (r, d_in), shared by the heads
        self.hydralora_B = nn.ParameterDict()  # (d_out, N*r): [B_1 ... B_N]
        self.hydralora_router = nn.ModuleDict()  # Linear(d_in -> N, bias=False)
        self.hydralora_dropout = nn.ModuleDict()
        self.hydralora_config: dict[str, HydraLoraConfig] = {}

    def update_layer(self, adapter_name: str, config: HydraLoraConfig) -> None:
        self.hydralora_config[adapter_name] = config
        self.hydralora_A[adapter_name] = nn.Parameter(torch.empty(config.r, self.in_features))
        self.hydralora_B[adapter_name] = nn.Parameter(torch.empty(self.out_features, config.num_heads * config.r))
        self.hydralora_router[adapter_name] = nn.Linear(self.in_features, config.num_heads, bias=False)
        self.add_dropout(adapter_name, config.lora_dropout)
        self.reset_parameters(adapter_name)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def reset_parameters(self, adapter_name: str) -> None:
        """A and the router ~ kaiming_uniform(a=sqrt(5)); every head B_i = 0, so ΔW = 0 at step 0."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.hydralora_A[adapter_name], a=math.sqrt(5))
            nn.init.zeros_(self.hydralora_B[adapter_name])
            nn.init.kaiming_uniform_(self.hydralora_router[adapter_name].weight, a=math.sqrt(5))

    def route_weights(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """(..., N) head weights of every token: softmax(W_r x)."""
        return torch.softmax(self.hydralora_router[adapter_name](x), dim=-1)

    def _adapter_output(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        A = self.hydralora_A[adapter_name]
        x = self._cast_input_dtype(x, A.dtype)
        weights = self.route_weights(adapter_name, x)
        self.observe_routing(weights, self.task_ids_for(x, required=False))
        hidden = F.linear(self.hydralora_dropout[adapter_name](x), A).unsqueeze(-2)  # (..., 1, r): one A for all
        return self.scaling(adapter_name) * mix_pieces(hidden, weights, self.hydralora_B[adapter_name])


class Linear(AdaptedLinear, HydraLoraLayer):
    """An ``nn.Linear`` adapted with HydraLoRA."""
