"""Configuration of HydraLoRA (Tian et al., NeurIPS 2024)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..capabilities import Capabilities, Merging, Routing
from ..config_base import RoutedConfig, check_dropout, check_positive


@dataclass
class HydraLoraConfig(RoutedConfig):
    """HydraLoRA: one shared A and several B heads, mixed per token by a learned router.

    Each adapted linear gives ``y = W0 x + b0 + (lora_alpha / r) * sum_i g_i(x) B_i A dropout(x)`` with
    ``g(x) = softmax(W_r x)``, a dense softmax over the heads computed for every token from that token's input.
    A is Kaiming-uniform, every B_i is zero (so the model is unchanged at step 0), and the router
    ``Linear(d_in -> num_heads, bias=False)`` is Kaiming-uniform. Routing needs no task ids (they are accepted and
    ignored); because it depends on the token, the weight change cannot be merged or exported as a LoRA.

    Defaults: 4 B heads, lora_alpha=32 and dropout 0.05 as in the official example script
    (``Clin0212/HydraLoRA``: ``HydraLoRA/fine-tuning.sh``; the paper chooses the head count by clustering the
    data); r=8 is this project's T5 recipe.

    Args:
        target_modules: names (or a regex) of the linear layers to adapt.
        num_tasks: task ids the model accepts (they do not change the output).
        r: rank of the shared A and of every head.
        num_heads: number of B heads N per adapted layer.
        lora_alpha: output scale numerator; the scale is ``lora_alpha / r``.
        lora_dropout: dropout on the input of A (the router sees the input without dropout).
    """

    r: int = field(default=8, metadata={"help": "Rank of the shared A and of every B head."})
    num_heads: int = field(default=4, metadata={"help": "Number of B heads per adapted layer."})
    lora_alpha: float = field(default=32, metadata={"help": "Output scale numerator (scale = lora_alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the input of the shared A."})

    def __post_init__(self):
        super().__post_init__()
        check_positive("r", self.r)
        check_positive("num_heads", self.num_heads)
        check_dropout(self.lora_dropout)

    def capabilities(self) -> Capabilities:
        return Capabilities(
            Routing.TOKEN,
            Merging.NONE,
            "its router weighs the B heads per token, so the weight change depends on the input; keep the adapter "
            "at inference.",
        )
