"""The TuckA layer: a frozen linear whose input is transformed by a routed, Tucker-factored low-rank map.

For an input row x and the forward's route (g, w) (arXiv 2511.06859):

    Ĝ_g = G[g] / ||G[g]||_F,  Ĉ = C / ||C||_F,  Û = U / ||U||_F
    M_{g,j} = Σ_q Ĉ[j, q] Ĝ_g[q]                  expert j of group g (r x r)
    M̄ = Σ_j w_j M_{g,j}
    y = W0 (x + alpha * x Û M̄ Ûᵀ) + b

In row form ``x ↦ x (I + alpha Û M̄ Ûᵀ)``, so for a fixed route the weight change is exact LoRA:
``W_eff = W0 + (alpha W0 Û M̄ᵀ) Ûᵀ`` (:meth:`TuckaLayer.route_lora_factors`).

Routing (``router.py``): the routing layer (the configured ``router_module``, or else the first adapted layer to
run in the call) computes the route from the mean of its input, padding excluded, and writes it to the tuner's
shared state; every other layer reads it. The routing layer recomputes the route every time it runs, as in the
reference: a T5 encoder router routes once per ``generate`` call, a decoder-only model's first layer at every
decoding step. The centroids, their "initialised" flag and the ALB bias live on one owner layer.
"""

from __future__ import annotations

import math

import torch
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from ...contrastive import token_mean
from ...routing import expand_to_batch, in_backward_pass
from ..base import AdaptedLinear, NotMergeableError, RoutedLayer
from .config import TuckaConfig
from .router import (
    Route,
    SharedRoute,
    balance_update,
    dense_weights,
    group_weights,
    routing_scores,
    select_expert,
)


class TuckaRoutingError(RuntimeError):
    """Raised when a layer has no route to read (the router module did not run first) or cannot route."""


class TuckaLayer(RoutedLayer):
    adapter_layer_names = ("tucka_core", "tucka_mode", "tucka_factor", "tucka_centroids")
    other_param_names = ("tucka_config", "tucka_centroids_ready", "tucka_alb_bias")
    parameter_groups = {"tucka_centroids": "router"}

    def __init__(self, base_layer: nn.Module, route):
        super().__init__(base_layer, route)
        self.tucka_core = nn.ParameterDict()  # G (k, p, r, r)
        self.tucka_mode = nn.ParameterDict()  # C (t, p)
        self.tucka_factor = nn.ParameterDict()  # U (d_in, r)
        # Router state, on the owner layer only: centroids E_c (k*t, d_in), whether the data-aware init has run,
        # and the ALB selection bias (k*t). The flag and the bias are saved so a reloaded adapter keeps them.
        self.tucka_centroids = nn.ParameterDict()
        self.tucka_centroids_ready = BufferDict(persistent=True)
        self.tucka_alb_bias = BufferDict(persistent=True)
        self.tucka_config: dict[str, TuckaConfig] = {}
        self.tucka_shared: SharedRoute | None = None  # set by the tuner after injection

    def rank_limit(self) -> int:
        """``d_in``: TuckA changes the input side only (U is d_in x r)."""
        return self.in_features

    # -- construction -------------------------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: TuckaConfig) -> None:
        self.tucka_config[adapter_name] = config
        self.tucka_core[adapter_name] = nn.Parameter(torch.empty(config.k, config.p, config.r, config.r))
        self.tucka_mode[adapter_name] = nn.Parameter(torch.empty(config.t, config.p))
        self.tucka_factor[adapter_name] = nn.Parameter(torch.empty(self.in_features, config.r))
        self.reset_parameters(adapter_name)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def reset_parameters(self, adapter_name: str) -> None:
        """One Kaiming-uniform r x r slice copied into all k*p core slices (every group starts identical);
        U and C Kaiming-uniform over fan-out, as the reference. No factor is zero, so ΔW ≠ 0 at step 0."""
        config = self.tucka_config[adapter_name]
        with torch.no_grad():
            piece = torch.empty(config.r, config.r)
            nn.init.kaiming_uniform_(piece, a=math.sqrt(5))
            self.tucka_core[adapter_name].copy_(piece.expand(config.k, config.p, -1, -1))
            nn.init.kaiming_uniform_(self.tucka_factor[adapter_name], a=math.sqrt(5), mode="fan_out")
            nn.init.kaiming_uniform_(self.tucka_mode[adapter_name], a=math.sqrt(5), mode="fan_out")

    def add_router(self, adapter_name: str, inference_mode: bool = False) -> None:
        """Make this layer own the model's router for ``adapter_name``: centroids, init flag and ALB bias."""
        config = self.tucka_config[adapter_name]
        experts = config.k * config.t
        self.tucka_centroids[adapter_name] = nn.Parameter(torch.empty(experts, self.in_features))
        kaiming = config.centroid_init == "kaiming"
        if kaiming:
            with torch.no_grad():
                nn.init.kaiming_uniform_(self.tucka_centroids[adapter_name], a=math.sqrt(5))
        else:  # placeholder until the first forward's data-aware init (never used before it)
            nn.init.zeros_(self.tucka_centroids[adapter_name])
        self.tucka_centroids_ready[adapter_name] = torch.tensor(kaiming)
        if config.balance == "alb":
            self.tucka_alb_bias[adapter_name] = torch.zeros(experts)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    # -- the adapter map ----------------------------------------------------------------------------------------
    def mixing_matrix(self, adapter_name: str, group: torch.Tensor | int, weights: torch.Tensor) -> torch.Tensor:
        """M̄ = Σ_j w_j Σ_q Ĉ[j, q] Ĝ_g[q]: (r, r) for one route, (batch, r, r) for per-example routes."""
        core = self.tucka_core[adapter_name][group]  # (p, r, r) or (batch, p, r, r)
        core = core / core.flatten(-3).norm(dim=-1)[..., None, None, None]
        mode = self.tucka_mode[adapter_name]
        mode = mode / mode.norm()
        return torch.einsum("...j,jq,...qab->...ab", weights.to(core), mode, core)

    def unit_factor(self, adapter_name: str) -> torch.Tensor:
        """Û = U / ||U||_F (d_in, r)."""
        factor = self.tucka_factor[adapter_name]
        return factor / factor.norm()

    def input_update(self, adapter_name: str, x: torch.Tensor, group, weights: torch.Tensor) -> torch.Tensor:
        """alpha * x Û M̄ Ûᵀ for rows x (batch, ..., d_in); per-example routes give each example its own M̄."""
        factor = self.unit_factor(adapter_name)
        mixing = self.mixing_matrix(adapter_name, group, weights)
        hidden = x @ factor  # (..., r)
        if mixing.dim() == 2:
            hidden = hidden @ mixing
        else:
            mixing = expand_to_batch(mixing, x.shape[0])
            hidden = (hidden.reshape(x.shape[0], -1, hidden.shape[-1]) @ mixing).reshape(hidden.shape)
        return self.tucka_config[adapter_name].alpha * (hidden @ factor.T)

    # -- routing ------------------------------------------------------------------------------------------------
    def adapter_route(self, adapter_name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (group, weights) this layer uses: pinned, computed here, or read from the shared state."""
        shared = self.tucka_shared
        route = shared.pinned.get(adapter_name)
        if route is None and self._routes_here(adapter_name):
            route = self._compute_route(adapter_name, x)
        if route is None:
            route = shared.routes.get(adapter_name)
        if route is None:
            router = self.tucka_config[adapter_name].router_module
            raise TuckaRoutingError(
                f"TuckA layer {self.module_key!r} ran before the router module {router!r} in this forward, so there "
                "is no route to read yet; set router_module to an adapted module that runs before every other one "
                f"(e.g. {self.module_key!r})."
            )
        return route.group, route.weights

    def _routes_here(self, adapter_name: str) -> bool:
        router = self.tucka_config[adapter_name].router_module
        if router is not None:
            return self.module_key == router
        current = self.tucka_shared.routes.get(adapter_name)
        return current is None or current.source is self  # the first adapted layer to run in this call

    def _compute_route(self, adapter_name: str, x: torch.Tensor) -> Route:
        """Route from this layer's input; in a backward recomputation the pick of the forward is kept."""
        config = self.tucka_config[adapter_name]
        owner = self.tucka_shared.owners[adapter_name]
        if x.shape[-1] != owner.in_features:
            raise TuckaRoutingError(
                f"TuckA routes from {self.module_key!r} (input width {x.shape[-1]}), but the centroids on "
                f"{owner.module_key!r} expect width {owner.in_features}; set router_module={owner.module_key!r}."
            )
        x = self._cast_input_dtype(x, owner.tucka_centroids[adapter_name].dtype)
        mask = self.route.token_mask(x)
        features = token_mean(x, mask, per_example=config.routing == "example")
        recomputing = in_backward_pass()
        if not recomputing and not bool(owner.tucka_centroids_ready[adapter_name]):
            batch_mean = features if features.dim() == 1 else token_mean(x, mask, per_example=False)
            owner.init_centroids(adapter_name, batch_mean)
        scores = routing_scores(owner.tucka_centroids[adapter_name], features, config.k, config.t)
        if recomputing:  # keep the forward's pick (the ALB bias has moved since); rebuild w with its graph
            expert = self.tucka_shared.routes[adapter_name].expert
        else:
            expert = select_expert(scores, owner.tucka_alb_bias[adapter_name] if config.balance == "alb" else None)
        group = expert // config.t
        route = Route(group, group_weights(scores, group), expert, self)
        self.tucka_shared.routes[adapter_name] = route
        if config.balance == "alb" and self.training and not recomputing:
            with torch.no_grad():
                balance_update(owner.tucka_alb_bias[adapter_name], expert, config.alb_gamma)
        return route

    @torch.no_grad()
    def init_centroids(self, adapter_name: str, mean_input: torch.Tensor) -> None:
        """Data-aware init (first forward): E_c[0] = x̄, E_c[i] = x̄ + U(-s, s) for i >= 1; marks them ready."""
        centroids = self.tucka_centroids[adapter_name]
        scale = self.tucka_config[adapter_name].ec_perturb_scale
        noise = (torch.rand_like(centroids[1:]) * 2 - 1) * scale
        centroids[0] = mean_input
        centroids[1:] = mean_input + noise
        self.tucka_centroids_ready[adapter_name].fill_(True)

    # -- merging ------------------------------------------------------------------------------------------------
    def route_lora_factors(self, adapter_name: str, group: int, weights: torch.Tensor):
        """Factors (B, A) of the exact weight change for a fixed route: B = alpha W0 Û M̄ᵀ, A = Ûᵀ."""
        base = self.get_base_layer().weight
        factor = self.unit_factor(adapter_name)
        mixing = self.mixing_matrix(adapter_name, group, weights.to(factor))
        up = self.tucka_config[adapter_name].alpha * (base.to(factor) @ factor @ mixing.T)
        return up, factor.T

    def task_lora_factors(self, adapter_name: str, task_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """TuckA's weight change depends on the input's route, not on the task: only a pinned route merges."""
        pinned = self.tucka_shared.pinned.get(adapter_name)
        if pinned is None:
            raise NotMergeableError(self.tucka_config[adapter_name].capabilities().reason)
        return self.route_lora_factors(adapter_name, int(pinned.group), pinned.weights)


class Linear(AdaptedLinear, TuckaLayer):
    """An ``nn.Linear`` adapted with TuckA."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapted = x
        for adapter_name in self._active_for_forward():
            group, weights = self.adapter_route(adapter_name, x)
            k = self.tucka_config[adapter_name].k
            self.observe_routing(dense_weights(group, weights.detach(), k, x.shape[0] if x.dim() > 1 else 1))
            rows = self._cast_input_dtype(x, self.tucka_factor[adapter_name].dtype)
            adapted = adapted + self.input_update(adapter_name, rows, group, weights).to(x.dtype)
        return self.base_layer(adapted, *args, **kwargs)
