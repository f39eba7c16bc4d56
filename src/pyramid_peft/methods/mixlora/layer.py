"""MixLoRA layers: a token-routed mixture of LoRA experts over each frozen FFN, and plain LoRA on attention.

For the rows x (N x d) entering an FFN block, with router W_r (E x d) and k experts per token (arXiv 2404.15159):

    w(x)     = renormalised top-k of softmax(W_r x)         (zero outside the k chosen experts; sums to 1)
    y        = sum_{e in TopK(x)} w_e(x) FFN_e(x)
    FFN_e(x) = out_e(hidden(in_1,e(x), ..., in_j,e(x)))     with lin_e(u) = lin(u) + (alpha/r) B_{lin,e} A_{lin,e} u

(``ffn.py`` gives ``hidden`` and the linears of each supported FFN.) The FFN is nonlinear, so the mixture is over
whole-FFN outputs, and each expert runs on its routed rows only: rows are gathered per expert, pushed through the
FFN with that expert's LoRA, and scattered back weighted. Two exact rewrites keep the frozen cost at one FFN pass
instead of k: the frozen input projections ``in_j(x)`` are computed once for all rows (an expert adds only its
LoRA term on its rows), and since the weights of a row sum to one, ``sum_e w_e out(h_e) = out(sum_e w_e h_e)`` for
the affine ``out``, so the frozen output linear runs once on the mixed hidden state and only the output LoRA
runs per expert.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...gating import switch_balance_loss, topk_softmax
from ..base import RoutedLayer
from .config import MixLoraConfig
from .ffn import FfnRecipe


def kaiming_lora_A(A: torch.Tensor) -> None:
    """Standard LoRA init of down factors (r x d_in, or a stack of them): U(±1/sqrt(d_in)) per factor."""
    for factor in A.reshape(-1, *A.shape[-2:]):
        nn.init.kaiming_uniform_(factor, a=math.sqrt(5))


def group_by_expert(weights: torch.Tensor) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(expert, rows, row weights)`` for every expert that at least one row is routed to.

    ``weights`` is (N, E), zero outside each row's chosen experts. One device sync (the per-expert counts).
    """
    rows, experts = weights.nonzero(as_tuple=True)
    order = torch.argsort(experts, stable=True)
    counts = torch.bincount(experts, minlength=weights.shape[-1]).tolist()
    groups = []
    for expert, expert_rows in enumerate(rows[order].split(counts)):
        if expert_rows.numel():
            groups.append((expert, expert_rows, weights[expert_rows, expert]))
    return groups


class MixLoraLayer(RoutedLayer):
    """What every MixLoRA layer shares: its config per adapter (scale, dropout and merging come from the base)."""

    other_param_names = ("mixlora_config",)


class Linear(nn.Module, MixLoraLayer):
    """Plain LoRA on an attention linear: ``y = W0 x + b0 + (alpha/r) B A dropout(x)``, A Kaiming, B zero."""

    adapter_layer_names = ("mixlora_A", "mixlora_B")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: MixLoraConfig, route=None):
        super().__init__()
        MixLoraLayer.__init__(self, base_layer, route)
        self.mixlora_A = nn.ParameterDict()
        self.mixlora_B = nn.ParameterDict()
        self.mixlora_dropout = nn.ModuleDict()
        self.mixlora_config: dict[str, MixLoraConfig] = {}
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: MixLoraConfig) -> None:
        self.mixlora_config[adapter_name] = config
        A = torch.empty(config.r, self.in_features)
        kaiming_lora_A(A)
        self.mixlora_A[adapter_name] = nn.Parameter(A)
        self.mixlora_B[adapter_name] = nn.Parameter(torch.zeros(self.out_features, config.r))
        self.add_dropout(adapter_name, config.lora_dropout)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for adapter_name in self._active_for_forward():
            A, B = self.mixlora_A[adapter_name], self.mixlora_B[adapter_name]
            u = self.mixlora_dropout[adapter_name](self._cast_input_dtype(x, A.dtype))
            result = result + (self.scaling(adapter_name) * F.linear(F.linear(u, A), B)).to(result.dtype)
        return result


class ExpertLoraLayer(MixLoraLayer):
    """A layer holding the experts' LoRA factors of one or more FFN linears, stacked over experts.

    ``mixlora_expert_A[adapter][name]`` is (E, r, d_in) and ``mixlora_expert_B[adapter][name]`` is (E, d_out, r)
    for the FFN linear ``name``: expert e's change of that linear is (alpha/r) B[e] A[e].
    """

    def _init_expert_containers(self) -> None:
        self.mixlora_expert_A = nn.ModuleDict()
        self.mixlora_expert_B = nn.ModuleDict()
        self.mixlora_dropout = nn.ModuleDict()
        self.mixlora_config: dict[str, MixLoraConfig] = {}

    def _add_experts(self, adapter_name: str, config: MixLoraConfig, linears: dict[str, nn.Linear]) -> None:
        A, B = nn.ParameterDict(), nn.ParameterDict()
        for name, linear in linears.items():
            A[name] = nn.Parameter(torch.empty(config.num_experts, config.r, linear.in_features))
            kaiming_lora_A(A[name].data)
            B[name] = nn.Parameter(torch.zeros(config.num_experts, linear.out_features, config.r))
        self.mixlora_config[adapter_name] = config
        self.mixlora_expert_A[adapter_name] = A
        self.mixlora_expert_B[adapter_name] = B
        self.add_dropout(adapter_name, config.lora_dropout)

    def _forward_adapter(self) -> str | None:
        """The one adapter whose experts run, or None when adapters are disabled."""
        active = self._active_for_forward()
        if len(active) > 1:
            raise ValueError(
                f"MixLoRA mixes the experts of one adapter per FFN, but {active} are active: activate one adapter "
                "at a time with model.set_adapter(name)."
            )
        return active[0] if active else None

    def _expert_lora(self, adapter_name: str, name: str, expert: int, u: torch.Tensor) -> torch.Tensor:
        """(alpha/r) B_e A_e u for FFN linear ``name``; ``u`` is already dropped out and cast."""
        A = self.mixlora_expert_A[adapter_name][name][expert]
        B = self.mixlora_expert_B[adapter_name][name][expert]
        return self.scaling(adapter_name) * F.linear(F.linear(u, A), B)

    def _output_lora(self, adapter_name: str, name: str, groups, hiddens, rows: int) -> torch.Tensor:
        """sum_e w_e (alpha/r) B_e A_e h_e of the output linear ``name``, scattered to (rows, d_out)."""
        B = self.mixlora_expert_B[adapter_name][name]
        out = B.new_zeros(rows, B.shape[1])
        dropout = self.mixlora_dropout[adapter_name]
        for (expert, expert_rows, weights), hidden in zip(groups, hiddens):
            u = dropout(self._cast_input_dtype(hidden, B.dtype))
            delta = self._expert_lora(adapter_name, name, expert, u)
            out.index_add_(0, expert_rows, weights[:, None].to(delta.dtype) * delta)
        return out


class ExpertHandoff:
    """What the first half of a split FFN (BERT's intermediate) leaves for its output linear: the route and each
    routed expert's hidden rows, tied to the exact tensor the first half returned."""

    def __init__(self):
        self._state = None

    def put(self, adapter_name: str, output: torch.Tensor, groups, hiddens) -> None:
        self._state = (adapter_name, output, groups, hiddens)

    def take(self, adapter_name: str, x: torch.Tensor):
        state, self._state = self._state, None
        if state is None or state[0] != adapter_name or state[1] is not x:
            raise RuntimeError(
                "The output linear of a split MixLoRA FFN (BERT's output.dense) ran on a tensor its intermediate "
                "module did not just produce. Run the FFN as intermediate -> output, as BertLayer.feed_forward_chunk "
                "does."
            )
        return state[2], state[3]


class FeedForward(nn.Module, ExpertLoraLayer):
    """An FFN module turned into a top-k mixture of E LoRA experts (see the module docstring for the maths).

    It subclasses :class:`RoutedLayer` (through :class:`MixLoraLayer`) so that the tuner's aux-loss collection and
    the merge entry points see it like every routed layer; it wraps a whole FFN module rather than an
    ``nn.Linear``, so it states its own :meth:`feature_sizes`.

    For a split FFN (``recipe.output_in_parent``, BERT) it returns the mixed hidden state ``sum_e w_e h_e`` (the
    input the frozen output linear expects) and hands the route and per-expert hidden rows to the
    :class:`ExpertOutput` wrapping that output linear.
    """

    adapter_layer_names = ("mixlora_router", "mixlora_expert_A", "mixlora_expert_B")
    parameter_groups = {"mixlora_router": "router"}

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: MixLoraConfig, route=None, *, recipe):
        super().__init__()
        self.recipe: FfnRecipe = recipe
        RoutedLayer.__init__(self, base_layer, route)
        self.handoff = ExpertHandoff() if recipe.output_in_parent else None
        self.mixlora_router = nn.ParameterDict()
        self._init_expert_containers()
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def feature_sizes(self) -> tuple[int, int]:
        """d_in of the first input linear; d_out of the output linear, or of the hidden state for a split FFN."""
        first = getattr(self.get_base_layer(), self.recipe.inputs[0])
        out = first.out_features if self.recipe.output_in_parent else self._output_linear().out_features
        return first.in_features, out

    def _output_linear(self) -> nn.Linear:
        return getattr(self.get_base_layer(), self.recipe.output)

    def update_layer(self, adapter_name: str, config: MixLoraConfig) -> None:
        ffn = self.get_base_layer()
        self._add_experts(adapter_name, config, {name: getattr(ffn, name) for name in self.recipe.own_linears})
        router = torch.empty(config.num_experts, self.in_features)
        nn.init.normal_(router, std=config.router_init_range)
        self.mixlora_router[adapter_name] = nn.Parameter(router)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def _get_base_layer_device_and_dtype(self, base_layer):
        """The FFN module has no weight of its own: its first input linear's device and dtype (PEFT then casts the
        experts and the router to the base dtype, unless ``autocast_adapter_dtype`` keeps them in float32)."""
        return super()._get_base_layer_device_and_dtype(getattr(base_layer, self.recipe.inputs[0]))

    # -- routing ------------------------------------------------------------------------------------------------
    def router_logits(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """W_r x for rows x, with the training-time multiplicative jitter on the router input only."""
        config = self.mixlora_config[adapter_name]
        router = self.mixlora_router[adapter_name]
        x = self._cast_input_dtype(x, router.dtype)
        if self.training and config.jitter_noise > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - config.jitter_noise, 1.0 + config.jitter_noise)
        return F.linear(x, router)

    def aux_terms(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The Switch balance loss E * sum_i f_i P_i of the last forward, over its real tokens: padding (attention
        mask 0) is routed like any token but left out, so it cannot pull the experts' load toward itself."""
        if self._aux_state.get("adapter") != adapter_name:
            return {}
        logits, weights, real = (self._aux_state[k] for k in ("logits", "weights", "real"))
        if real is not None:
            logits, weights = logits[real], weights[real]
        return {"balance": switch_balance_loss(logits, weights)}

    # -- forward ------------------------------------------------------------------------------------------------
    def expert_hidden(self, adapter_name: str, expert: int, u: torch.Tensor, frozen: list[torch.Tensor]):
        """Expert ``expert``'s hidden state on its rows: ``hidden(in_j(x) + LoRA_{j,e}(x))``.

        ``u`` is the rows' LoRA input (dropped out, cast), ``frozen`` the rows' frozen input projections.
        """
        pre = [
            base + self._expert_lora(adapter_name, name, expert, u).to(base.dtype)
            for name, base in zip(self.recipe.inputs, frozen)
        ]
        return self.recipe.hidden(self.get_base_layer(), pre)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter_name = self._forward_adapter()
        if adapter_name is None:
            self.clear_aux()
            return self.base_layer(x, *args, **kwargs)
        ffn = self.get_base_layer()
        rows = x.reshape(-1, x.shape[-1])
        logits = self.router_logits(adapter_name, rows)
        weights = topk_softmax(logits, self.mixlora_config[adapter_name].top_k)
        self.observe_routing(weights.view(*x.shape[:-1], -1), self.task_ids_for(x, required=False))
        mask = self.route.token_mask(x)
        real = None if mask is None else mask.reshape(-1).to(device=rows.device, dtype=torch.bool)
        self.record_aux(adapter=adapter_name, logits=logits, weights=weights, real=real)
        groups = group_by_expert(weights)

        frozen = [getattr(ffn, name)(rows) for name in self.recipe.inputs]  # once for all rows and experts
        lora_dtype = self.mixlora_expert_A[adapter_name][self.recipe.inputs[0]].dtype
        u = self.mixlora_dropout[adapter_name](self._cast_input_dtype(rows, lora_dtype))
        mixed = frozen[0].new_zeros(rows.shape[0], frozen[0].shape[-1])
        hiddens = []
        for expert, expert_rows, expert_weights in groups:
            hidden = self.expert_hidden(adapter_name, expert, u[expert_rows], [f[expert_rows] for f in frozen])
            hiddens.append(hidden)
            mixed.index_add_(0, expert_rows, expert_weights[:, None].to(hidden.dtype) * hidden)

        if self.recipe.output_in_parent:
            output = mixed.view(*x.shape[:-1], -1)
            self.handoff.put(adapter_name, output, groups, hiddens)
            return output
        linear = self._output_linear()
        result = linear(self._cast_input_dtype(mixed, linear.weight.dtype))
        delta = self._output_lora(adapter_name, self.recipe.output, groups, hiddens, rows.shape[0])
        return (result + delta.to(result.dtype)).view(*x.shape[:-1], -1)


class ExpertOutput(nn.Module, ExpertLoraLayer):
    """The output linear of a split FFN (BERT's ``output.dense``) with the experts' LoRA of that linear.

    ``W0 h + b0 + sum_e w_e (alpha/r) B_e A_e h_e``: the frozen part on the mixed hidden state ``h`` its
    :class:`FeedForward` returned, the expert part on the per-expert hidden rows handed over with it. The module
    around it (BERT's dropout and residual LayerNorm) runs unchanged.
    """

    adapter_layer_names = ("mixlora_expert_A", "mixlora_expert_B")

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: MixLoraConfig,
        route=None,
        *,
        name: str,
        handoff: ExpertHandoff,
    ):
        super().__init__()
        MixLoraLayer.__init__(self, base_layer, route)
        self.name = name
        self.handoff = handoff
        self._init_expert_containers()
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: MixLoraConfig) -> None:
        self._add_experts(adapter_name, config, {self.name: self.get_base_layer()})
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        adapter_name = self._forward_adapter()
        if adapter_name is None:
            return result
        groups, hiddens = self.handoff.take(adapter_name, x)
        delta = self._output_lora(adapter_name, self.name, groups, hiddens, result[..., 0].numel())
        return result + delta.view_as(result).to(result.dtype)
