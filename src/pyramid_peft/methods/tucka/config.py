"""Configuration of TuckA (Tucker Adaptation; AAAI 2026, arXiv 2511.06859)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..capabilities import Capabilities, Merging, Routing
from ..config_base import RoutedConfig, check_choice, check_positive


@dataclass
class TuckaConfig(RoutedConfig):
    """TuckA: a routed Tucker-factored adapter applied multiplicatively on the input side (arXiv 2511.06859).

    Every adapted linear ``W0`` (bias b) becomes, for a row x and the route (g, w) of its forward pass,

        y = W0 (x + alpha * x Û M̄ Ûᵀ) + b,    M̄ = Σ_j w_j Σ_q Ĉ[j, q] Ĝ_g[q]    (r x r),

    with the core ``G`` (k x p x r x r), the mode factor ``C`` (t x p) and the factor ``U`` (d_in x r) normalised
    by their Frobenius norms every forward (``Ĝ_g`` per group block). One router for the whole model scores the mean
    input of the router module against k*t centroids; the best score picks the group g and that group's t sigmoid
    scores are the weights w. Every adapted layer of the forward pass uses the same route.

    Task ids are accepted (the tuner routes them like every method of this package) and ignored.

    Args:
        target_modules: names (or a regex) of the linear layers to adapt.
        r: rank of every expert (U has r columns).
        k: number of expert groups (Tucker "tensors").
        t: experts per group (frontal slices of a group tensor).
        p: rank shared by the experts of a group (the Tucker mode-1 rank).
        alpha: scale of the input-side update.
        ec_perturb_scale: s of the data-aware centroid init: E_c[0] = x̄, E_c[i] = x̄ + U(-s, s) (the reference
            config's default is 1; its GLUE script uses 10).
        centroid_init: ``"data"`` (data-aware, on the first forward, exactly once) or ``"kaiming"`` (at creation;
            the reference's comparison option).
        router_module: full name of the module whose input routes (e.g. ``"encoder.block.0.layer.0.SelfAttention.q"``);
            ``None`` means the first adapted module to run in each forward (its centroids live on the first adapted
            module in registration order, which must have the same input width).
        routing: ``"batch"`` (the reference: one route from the mean over batch and sequence) or ``"example"`` (one
            route per example from its own mean input, for mixed-task batches).
        balance: ``"none"`` or ``"alb"``: auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias b_i added to
            the k*t routing scores for selection only (the weights stay the unbiased sigmoid scores), updated after
            every training forward by ``b_i += alb_gamma * sign(mean load - load_i)``. Not a gradient.
        alb_gamma: step of the ALB bias update.
    """

    r: int = field(default=8, metadata={"help": "Rank of every expert."})
    k: int = field(default=3, metadata={"help": "Number of expert groups."})
    t: int = field(default=3, metadata={"help": "Experts per group."})
    p: int = field(default=2, metadata={"help": "Rank shared within a group (Tucker mode-1 rank)."})
    alpha: float = field(default=1.0, metadata={"help": "Scale of the input-side update."})
    ec_perturb_scale: float = field(default=1.0, metadata={"help": "Perturbation of the data-aware centroid init."})
    centroid_init: str = field(default="data", metadata={"help": "'data' (first forward) or 'kaiming'."})
    router_module: str | None = field(default=None, metadata={"help": "Module whose input routes; None: first."})
    routing: str = field(default="batch", metadata={"help": "'batch' (reference) or 'example'."})
    balance: str = field(default="none", metadata={"help": "'none' or 'alb' (auxiliary-loss-free balancing)."})
    alb_gamma: float = field(default=1e-3, metadata={"help": "Step of the ALB bias update."})

    def __post_init__(self):
        super().__post_init__()
        for name in ("r", "k", "t", "p"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer.")
        check_positive("ec_perturb_scale", self.ec_perturb_scale)
        check_positive("alb_gamma", self.alb_gamma)
        check_choice("centroid_init", self.centroid_init, ("data", "kaiming"))
        check_choice("routing", self.routing, ("batch", "example"))
        check_choice("balance", self.balance, ("none", "alb"))

    def capabilities(self) -> Capabilities:
        return Capabilities(
            Routing.BATCH,
            Merging.NONE,
            "it routes each batch by its input, so it has no per-task weight change; merge one fixed route with "
            "pyramid_peft.merge_tucka_route(model, group, weights), or pin it with "
            "pyramid_peft.methods.tucka.fixed_route(model, group, weights) around merge_for_task / export_lora.",
        )
