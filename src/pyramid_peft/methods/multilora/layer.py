"""The MultiLoRA layer: a frozen linear plus n parallel LoRAs weighted by learnable scalars.

Forward, for every input row x (MultiLoRA, arXiv 2311.11501):

    y = W0 x + b0 + (alpha / r) * sum_i s_i B_i A_i dropout(x)

The n LoRAs are stored stacked along the rank (``methods/mixture.py``): A = [A_1; ...; A_n] (n*r x d_in) and
B = [B_1 ... B_n] (d_out x n*r), so the forward is two matrix products with the scalars applied in between.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..base import AdaptedLinear, RoutedLayer
from ..mixture import fold_weights, mix_pieces
from .config import MultiLoraConfig


class MultiLoraLayer(RoutedLayer):
    adapter_layer_names = ("multilora_A", "multilora_B", "multilora_scales")
    other_param_names = ("multilora_config",)

    def __init__(self, base_layer: nn.Module, route):
        super().__init__(base_layer, route)
        self.multilora_A = nn.ParameterDict()  # (n*r, d_in)
        self.multilora_B = nn.ParameterDict()  # (d_out, n*r)
        self.multilora_scales = nn.ParameterDict()  # (n,)
        self.multilora_dropout = nn.ModuleDict()
        self.multilora_config: dict[str, MultiLoraConfig] = {}

    def update_layer(self, adapter_name: str, config: MultiLoraConfig) -> None:
        rank = config.num_loras * config.r
        self.multilora_config[adapter_name] = config
        self.multilora_A[adapter_name] = nn.Parameter(torch.empty(rank, self.in_features))
        self.multilora_B[adapter_name] = nn.Parameter(torch.empty(self.out_features, rank))
        self.multilora_scales[adapter_name] = nn.Parameter(torch.empty(config.num_loras))
        self.add_dropout(adapter_name, config.lora_dropout)
        self.reset_parameters(adapter_name)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def reset_parameters(self, adapter_name: str) -> None:
        """A_i, B_i ~ kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)) per piece; s = 0 so ΔW = 0 at step 0."""
        r = self.multilora_config[adapter_name].r
        with torch.no_grad():
            # Stacking along the rank keeps each A_i's fan-in (d_in); each B_i is initialised on its own view so
            # its fan-in is r, not n*r.
            nn.init.kaiming_uniform_(self.multilora_A[adapter_name], a=math.sqrt(5))
            for piece in self.multilora_B[adapter_name].split(r, dim=1):
                nn.init.kaiming_uniform_(piece, a=math.sqrt(5))
            nn.init.zeros_(self.multilora_scales[adapter_name])

    def _adapter_output(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        config = self.multilora_config[adapter_name]
        A = self.multilora_A[adapter_name]
        x = self._cast_input_dtype(x, A.dtype)
        hidden = F.linear(self.multilora_dropout[adapter_name](x), A).unflatten(-1, (config.num_loras, config.r))
        out = mix_pieces(hidden, self.multilora_scales[adapter_name], self.multilora_B[adapter_name])
        return self.scaling(adapter_name) * out

    def task_lora_factors(self, adapter_name: str, task_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B', A) with B' A = (alpha/r) sum_i s_i B_i A_i, rank n*r; the same for every task."""
        up = fold_weights(self.multilora_B[adapter_name], self.multilora_scales[adapter_name])
        return self.scaling(adapter_name) * up, self.multilora_A[adapter_name]


class Linear(AdaptedLinear, MultiLoraLayer):
    """An ``nn.Linear`` adapted with MultiLoRA."""
