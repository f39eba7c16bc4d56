"""Configuration of MixLoRA (Li et al. 2024, arXiv 2404.15159)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..capabilities import Capabilities, Merging, Routing
from ..config_base import RoutedConfig, check_dropout, check_positive

# Default FFN module names, by ``model_type``. BERT's FFN is split over two modules: the name given is the
# ``intermediate`` half, and its sibling ``output.dense`` is adapted with it (see ``ffn.py``).
DEFAULT_FFN_MODULES: dict[str, list[str]] = {
    "llama": ["mlp"],
    "mistral": ["mlp"],
    "qwen2": ["mlp"],
    "t5": ["DenseReluDense"],
    "bert": ["intermediate"],
}

# Default attention projections that get plain LoRA, by ``model_type``.
DEFAULT_ATTENTION_MODULES: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "t5": ["q", "k", "v", "o"],
    "bert": ["query", "key", "value", "attention.output.dense"],
}


@dataclass
class MixLoraConfig(RoutedConfig):
    """MixLoRA: a token-routed mixture of LoRA experts over each frozen FFN, plus plain LoRA on attention.

    Every FFN block becomes ``y = sum_{e in TopK(x)} w_e(x) FFN_e(x)``, where ``FFN_e`` is the frozen FFN whose
    linears (LLaMA gate/up/down, T5 wi/wo or wi_0/wi_1/wo, BERT intermediate.dense/output.dense) each carry expert
    ``e``'s own LoRA ``(lora_alpha / r) B_e A_e``. The router is ``w(x) = renormalised top-k of softmax(W_r x)``
    with ``W_r`` (num_experts x d_model) ~ N(0, router_init_range^2). The Switch load-balance loss
    ``num_experts * sum_i f_i P_i`` is reported as the auxiliary term ``"balance"``, weighted by
    ``router_aux_loss_coef`` in ``pyramid_peft.aux_loss``. Routing is per token, so the method ignores task ids
    (it accepts them, so multi-task training code runs unchanged) and cannot be merged.

    Args:
        target_modules: attention linears that get plain LoRA. ``None`` picks the model's q/k/v/o projections
            (llama, mistral, qwen2, t5, bert); ``[]`` adapts no attention layer. Linears inside an adapted FFN may
            not be listed: the experts adapt them.
        ffn_modules: names (suffix match) or one regex naming the FFN modules to turn into mixtures. ``None``
            picks ``mlp`` (llama, mistral, qwen2), ``DenseReluDense`` (t5) or ``intermediate`` (bert).
        num_tasks: accepted for a uniform multi-task interface; task ids are validated against it and ignored.
        r: LoRA rank, for every expert and attention LoRA.
        lora_alpha: LoRA scale numerator; the scale is ``lora_alpha / r``.
        lora_dropout: dropout on every LoRA input.
        num_experts: experts per FFN block.
        top_k: experts per token; ``top_k == num_experts`` is a dense softmax mixture.
        router_init_range: standard deviation of the router's Gaussian initialisation.
        jitter_noise: in training, the router input is multiplied by U(1 - jitter_noise, 1 + jitter_noise);
            0 disables it. Only the router sees the noise, the experts see the clean input.
        router_aux_loss_coef: weight of the load-balance loss.
    """

    ffn_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Names or a regex of the FFN modules to turn into LoRA-expert mixtures."}
    )
    r: int = field(default=8, metadata={"help": "LoRA rank of every expert and attention adapter."})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA scale numerator (scale = lora_alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on every LoRA input."})
    num_experts: int = field(default=8, metadata={"help": "Experts per FFN block."})
    top_k: int = field(default=2, metadata={"help": "Experts per token."})
    router_init_range: float = field(default=0.02, metadata={"help": "Std of the router's N(0, std^2) init."})
    jitter_noise: float = field(default=0.0, metadata={"help": "Multiplicative router-input noise in training."})
    router_aux_loss_coef: float = field(default=0.001, metadata={"help": "Weight of the load-balance loss."})

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.ffn_modules, (list, tuple)):
            self.ffn_modules = set(self.ffn_modules)
        check_positive("r", self.r)
        check_positive("num_experts", self.num_experts)
        check_positive("router_init_range", self.router_init_range)
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"top_k={self.top_k!r} must be an integer between 1 and num_experts ({self.num_experts}); "
                "top_k equal to num_experts gives a dense softmax mixture."
            )
        check_dropout(self.lora_dropout)
        check_dropout(self.jitter_noise, "jitter_noise")
        if self.router_aux_loss_coef < 0:
            raise ValueError(f"router_aux_loss_coef={self.router_aux_loss_coef} must be >= 0 (0 disables it).")

    def capabilities(self) -> Capabilities:
        return Capabilities(
            Routing.TOKEN,
            Merging.NONE,
            "it routes every token to its own experts and each expert is a whole nonlinear FFN, so its weight "
            "change depends on the input; keep the adapter unmerged for inference.",
        )

    def aux_loss_weights(self) -> dict[str, float]:
        return {"balance": self.router_aux_loss_coef}
