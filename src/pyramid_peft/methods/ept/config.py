"""Configuration of Expert Pyramid Tuning (EPT)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..capabilities import Capabilities, Merging, Routing
from ..config_base import RoutedConfig, check_choice, check_dropout, check_positive


@dataclass
class EptConfig(RoutedConfig):
    """Expert Pyramid Tuning: a mixture of deconvolution experts over one shared low-rank seed.

    Each adapted linear ``W0`` becomes ``W0 + (lora_alpha / r) * sum_{e in TopK(t)} g_e(t) ΔW_e`` where ``t`` is
    the example's task, ``ΔW_e = ConvT_{k_e}(S_{k_e})`` is a transposed convolution with kernel size and stride
    ``k_e`` of the seed slice ``S_k = B[:m_k] A[:, :n_k]``, and the gate ``g(t)`` is a top-k softmax over a learned
    router fed by the module's task embedding (arXiv 2603.12577). See ``methods/ept/experts.py`` for the exact forms.

    Defaults: the paper's structure, and a start that trains at the learning rates LoRA users pick. The paper
    form of the initialisation is ``factor_init="gaussian", kernel_init="zeros", dim_scale="rank_sq"``; it needs a
    learning rate near 1e-2, and this is why. With K = 0, ΔW = S ⊗ K = 0 and the seed factors get no gradient
    at step 0 (∂L/∂A and ∂L/∂B carry a factor K); only the k² kernel entries of each expert learn, along the
    fixed random seed S, whose entries are small (N(0, 1/r²) factors and the (ρ/r)² scale give |S| ≈ 0.02 at
    r = 8). The factors' share of the change, dS ⊗ K, is then of second order in the learning rate until |K| ≈ 1,
    which takes about 1/lr steps. The defaults start as LoRA does instead: B = 0 (so ΔW = 0 and the model is
    unchanged at step 0) and B learns from step 1, through kernels of unit variance. A transposed convolution
    with stride = kernel size gives every entry of ΔW exactly one term S[i, j] K[p, q] (fan-in 1), so unit
    variance passes the seed's scale on unchanged; Kaiming's U(±1/k) (fan-in k², as for an ordinary
    convolution) shrinks every expert's update 2-8x, and ``rank_sq`` shrinks rank component ρ by (ρ/r)².

    The short learning curves that compare these starts (``benchmarks/ept_defaults.py``) are on the docs' results
    pages (docs/ept.md links them). The paper form stays available through the three options above.

    Args:
        target_modules: names (or a regex) of the linear layers to adapt.
        num_tasks: number of task ids the router accepts (rows of each task-embedding table).
        r: rank of the shared seed factors.
        lora_alpha: output scale numerator; the scale is ``lora_alpha / r``.
        lora_dropout: dropout on the adapter input.
        kernel_sizes: one kernel size per expert (the pyramid), e.g. ``[2, 2, 4, 4, 6, 6, 8, 8]``.
        top_k: experts used per task; ``top_k == len(kernel_sizes)`` is dense routing.
        expert_form: ``"kron2d"`` (paper: k x k kernel, ``ΔW = S ⊗ K``, ceil + crop) or ``"code1d"`` (public code:
            per-output-channel kernel rows over the first ``floor(d_in/k)`` inputs, floor + pad).
        factor_init: ``"standard"`` (default; LoRA's: A Kaiming, B zero), ``"gaussian"`` (paper: A, B ~ N(0, 1/r^2))
            or ``"kaiming"`` (public code: both Kaiming).
        kernel_init: ``"unit"`` (default: entries ~ U(-√3, √3), variance 1), ``"zeros"`` (paper: model unchanged
            at step 0 with Gaussian factors), ``"kaiming"`` (public code: U(±1/k) for kron2d) or ``None`` (zeros
            for kron2d with non-zero factors, else kaiming).
        alp: Adaptive LoRA Pruner: experts slice prefixes of one shared seed (True) or own separate seeds (False).
        dim_scale: ALP's dimension-aware scaling, a reconstruction (the paper's equation was lost): ``"none"``
            (default; the public code), ``"rank_sq"`` scales rank component ρ by ρ/r on both factors,
            ``"rank_lin"`` once, ``"coord_lin"`` scales seed coordinates by their tier (shared coordinates smallest).
        gate_form: ``"paper"`` (softmax over the top-k logits / router_tau) or ``"code"`` (softmax, top-k, softmax).
        router_tau: temperature of the paper gate.
        router_input: ``"task"`` (task embedding; mergeable per task), ``"token"`` or ``"task+token"``.
        contrastive_weight: λ of the contrastive task-embedding loss (eq. 7); 0 disables it.
        contrastive_tau: temperature of its cosine similarities.
        contrastive_pooling: ``"first"`` (position 0, as the code) or ``"mean"`` (mean over non-pad tokens).
        contrastive_modules: ``"encoder"`` (encoder modules of encoder-decoder models, all modules otherwise) or
            ``"all"``.
        materialize: build each expert's dense ΔW with a literal ConvTranspose per forward (slow; for reference
            and benchmarks only).
    """

    r: int = field(default=8, metadata={"help": "Rank of the shared seed factors."})
    lora_alpha: float = field(default=32, metadata={"help": "Output scale numerator (scale = lora_alpha / r)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "Dropout on the adapter input."})
    kernel_sizes: list[int] = field(
        default_factory=lambda: [2, 2, 4, 4, 6, 6, 8, 8], metadata={"help": "One kernel size per expert."}
    )
    top_k: int = field(default=2, metadata={"help": "Experts per task; len(kernel_sizes) means dense routing."})
    expert_form: str = field(default="kron2d", metadata={"help": "'kron2d' (paper) or 'code1d' (public code)."})
    factor_init: str = field(default="standard", metadata={"help": "'standard', 'gaussian' or 'kaiming'."})
    kernel_init: str | None = field(default="unit", metadata={"help": "'unit', 'zeros', 'kaiming' or None (auto)."})
    alp: bool = field(default=True, metadata={"help": "Experts share prefix slices of one seed (ALP)."})
    dim_scale: str = field(default="none", metadata={"help": "'none', 'rank_sq', 'rank_lin' or 'coord_lin'."})
    gate_form: str = field(default="paper", metadata={"help": "'paper' (top-k softmax) or 'code' (double softmax)."})
    router_tau: float = field(default=1.0, metadata={"help": "Temperature of the paper gate."})
    router_input: str = field(default="task", metadata={"help": "'task', 'token' or 'task+token'."})
    contrastive_weight: float = field(default=0.1, metadata={"help": "Weight λ of the contrastive loss."})
    contrastive_tau: float = field(default=0.05, metadata={"help": "Temperature of the contrastive loss."})
    contrastive_pooling: str = field(default="first", metadata={"help": "'first' or 'mean'."})
    contrastive_modules: str = field(default="encoder", metadata={"help": "'encoder' or 'all'."})
    materialize: bool = field(default=False, metadata={"help": "Literal ConvTranspose experts (reference only)."})

    def __post_init__(self):
        super().__post_init__()
        check_positive("r", self.r)
        if not self.kernel_sizes:
            raise ValueError("kernel_sizes is empty: give one kernel size per expert, e.g. [2, 2, 4, 4, 6, 6, 8, 8].")
        bad = [k for k in self.kernel_sizes if not isinstance(k, int) or k < 1]
        if bad:
            raise ValueError(f"kernel_sizes must be positive integers, got {bad}; e.g. [2, 2, 4, 4, 6, 6, 8, 8].")
        self.kernel_sizes = list(self.kernel_sizes)
        if not 1 <= self.top_k <= len(self.kernel_sizes):
            raise ValueError(
                f"top_k={self.top_k} must be between 1 and the number of experts ({len(self.kernel_sizes)}); "
                "top_k equal to the number of experts gives dense routing."
            )
        check_choice("expert_form", self.expert_form, ("kron2d", "code1d"))
        check_choice("factor_init", self.factor_init, ("gaussian", "kaiming", "standard"))
        check_choice("kernel_init", self.kernel_init, ("zeros", "kaiming", "unit", None))
        check_choice("dim_scale", self.dim_scale, ("none", "rank_sq", "rank_lin", "coord_lin"))
        check_choice("gate_form", self.gate_form, ("paper", "code"))
        check_choice("router_input", self.router_input, ("task", "token", "task+token"))
        check_choice("contrastive_pooling", self.contrastive_pooling, ("first", "mean"))
        check_choice("contrastive_modules", self.contrastive_modules, ("encoder", "all"))
        check_positive("router_tau", self.router_tau)
        check_positive("contrastive_tau", self.contrastive_tau)
        check_dropout(self.lora_dropout)
        if self.resolved_kernel_init == "zeros" and self.factor_init == "standard":
            raise ValueError(
                "factor_init='standard' (B = 0) with zero kernels leaves every expert at zero with zero gradient; "
                "use kernel_init='kaiming'."
            )

    @property
    def resolved_kernel_init(self) -> str:
        if self.kernel_init is not None:
            return self.kernel_init
        if self.expert_form == "kron2d" and self.factor_init != "standard":
            return "zeros"
        return "kaiming"

    @property
    def uses_task_embedding(self) -> bool:
        """Whether the adapter has a task-embedding table: the router reads it (``router_input`` 'task' or
        'task+token'), or the contrastive loss trains it (``contrastive_weight > 0``). Token routing without the
        loss would leave it a saved parameter that nothing uses."""
        return self.router_input != "token" or self.contrastive_weight > 0

    def capabilities(self) -> Capabilities:
        if self.router_input == "task":
            return Capabilities(Routing.TASK, Merging.PER_TASK)
        return Capabilities(
            Routing.TOKEN,
            Merging.NONE,
            f"router_input={self.router_input!r} routes every token separately, so its weight change depends on the "
            "input; train with router_input='task' for a mergeable adapter.",
        )

    def aux_loss_weights(self) -> dict[str, float]:
        return {"contrastive": self.contrastive_weight}

    @classmethod
    def reference_code(cls, **overrides) -> EptConfig:
        """The public EPT code's choices (docs/ept.md): code1d experts, Kaiming init, double softmax."""
        settings = dict(
            expert_form="code1d", factor_init="kaiming", kernel_init="kaiming", dim_scale="none", gate_form="code"
        )
        settings.update(overrides)
        return cls(**settings)
