"""Configuration of MoRE (Mixture of Rank Experts; Zhang et al., ACL Findings 2025)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..capabilities import Capabilities, Merging, Routing
from ..config_base import RoutedConfig, check_choice, check_dropout, check_positive


@dataclass
class MoreConfig(RoutedConfig):
    """MoRE: one LoRA per module whose experts are its nested ranks, chosen per task by a learned selector.

    Each adapted linear ``W0`` becomes, for an input row x of task t,

        y = W0 x + b0 + (lora_alpha / r) * B_s[:, :ρ(t)] A_s[:ρ(t), :] dropout(x),

    where ``A`` (r x d_in) and ``B`` (d_out x r) are the LoRA factors, ``A_s`` / ``B_s`` scale rank component ρ by
    ``s_ρ = ρ / r`` on both factors, and ``ρ(t)`` is the rank of the expert the module's selector picks for task t:
    ``argmax softmax(W_g e_t + b_g)`` over the experts, with ``e_t`` the module's task embedding (arXiv 2505.22694).

    Args:
        target_modules: names (or a regex) of the linear layers to adapt.
        num_tasks: number of task ids (rows of each task-embedding table).
        r: rank of the LoRA factors (the largest expert).
        lora_alpha: output scale numerator; the scale is ``lora_alpha / r``.
        lora_dropout: dropout on the adapter input.
        num_experts: number of rank experts; ``None`` means ``r`` (expert e uses rank e). With fewer experts,
            expert e (1-based) uses rank ``e * r // num_experts``, so the largest expert always has rank r.
        rank_scale: scale rank component ρ by ρ/r on both factors (the released code since commit b31d8fe).
        route_mode: ``"intended"`` (the selector learns through a straight-through argmax) or ``"reference"``
            (the public code's behaviour: each (module, task) keeps the expert picked on its first forward, saved
            with the adapter, and the selector gets no gradient; task embeddings learn from the contrastive loss
            only).
        contrastive_weight: λ of the contrastive task-embedding loss (arXiv 2603.12577, eq. 7); 0 disables it.
        contrastive_tau: temperature of its cosine similarities.
        contrastive_pooling: ``"first"`` (position 0, as the code) or ``"mean"`` (mean over non-pad tokens).
        contrastive_modules: ``"encoder"`` (encoder modules of encoder-decoder models, all modules otherwise) or
            ``"all"``.
    """

    r: int = field(default=8, metadata={"help": "Rank of the LoRA factors (the largest expert)."})
    lora_alpha: float = field(default=32, metadata={"help": "Output scale numerator (scale = lora_alpha / r)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "Dropout on the adapter input."})
    num_experts: int | None = field(default=None, metadata={"help": "Rank experts; None means r."})
    rank_scale: bool = field(default=True, metadata={"help": "Scale rank component ρ by ρ/r on both factors."})
    route_mode: str = field(default="intended", metadata={"help": "'intended' (learned) or 'reference' (frozen)."})
    contrastive_weight: float = field(default=0.1, metadata={"help": "Weight λ of the contrastive loss."})
    contrastive_tau: float = field(default=0.05, metadata={"help": "Temperature of the contrastive loss."})
    contrastive_pooling: str = field(default="first", metadata={"help": "'first' or 'mean'."})
    contrastive_modules: str = field(default="encoder", metadata={"help": "'encoder' or 'all'."})

    def capabilities(self) -> Capabilities:
        return Capabilities(Routing.TASK, Merging.PER_TASK)

    def __post_init__(self):
        super().__post_init__()
        check_positive("r", self.r)
        if self.num_experts is None:
            self.num_experts = self.r
        if not isinstance(self.num_experts, int) or not 1 <= self.num_experts <= self.r:
            raise ValueError(
                f"num_experts={self.num_experts!r} must be an integer between 1 and r={self.r}: each expert is a "
                "distinct nested rank of the LoRA factors."
            )
        check_choice("route_mode", self.route_mode, ("intended", "reference"))
        check_choice("contrastive_pooling", self.contrastive_pooling, ("first", "mean"))
        check_choice("contrastive_modules", self.contrastive_modules, ("encoder", "all"))
        check_positive("contrastive_tau", self.contrastive_tau)
        if self.contrastive_weight < 0:
            raise ValueError(f"contrastive_weight={self.contrastive_weight} must be >= 0 (0 disables the loss).")
        check_dropout(self.lora_dropout)

    @property
    def expert_ranks(self) -> list[int]:
        """Rank of each expert, smallest first: ``e * r // num_experts`` for e = 1..num_experts (distinct)."""
        return [e * self.r // self.num_experts for e in range(1, self.num_experts + 1)]

    def aux_loss_weights(self) -> dict[str, float]:
        return {"contrastive": self.contrastive_weight}
