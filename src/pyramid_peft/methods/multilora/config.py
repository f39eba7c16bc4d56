"""Configuration of MultiLoRA (Wang et al. 2023, arXiv 2311.11501)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..capabilities import Capabilities, Merging, Routing
from ..config_base import RoutedConfig, check_dropout, check_positive


@dataclass
class MultiLoraConfig(RoutedConfig):
    """MultiLoRA: n parallel rank-r LoRAs mixed by learnable per-module scalars ("horizontal scaling").

    Each adapted linear ``W0`` becomes ``W0 + (lora_alpha / r) * sum_i s_i B_i A_i``. Every A_i and B_i is
    Kaiming-uniform (B is *not* zero, unlike LoRA) and every s_i starts at 0, so the model is unchanged at step 0
    and the scalars take the first gradient. The change is the same for every example: task ids are accepted and
    ignored, and the adapter merges (``merge_for_task`` with any task id) or exports as one LoRA of rank
    ``num_loras * r``.

    Defaults: ``num_loras=4`` with ``r=8`` is the size of MoRE's T5 re-implementation that the EPT paper's Table 2
    reports (1.56M/task = 4 x the 0.39M/task LoRA-r8 row; inferred from the table, no code is public);
    ``lora_alpha=32`` and ``lora_dropout=0.1`` are that lineage's LoRA recipe. The MultiLoRA paper itself trains
    LLaMA models; its own settings are not reproduced here.

    Args:
        target_modules: names (or a regex) of the linear layers to adapt.
        num_tasks: task ids the model accepts (they do not change the output; merging checks the range).
        r: rank of each parallel LoRA.
        num_loras: number of parallel LoRAs n per adapted layer.
        lora_alpha: output scale numerator; the scale is ``lora_alpha / r``.
        lora_dropout: dropout on the adapter input.
    """

    r: int = field(default=8, metadata={"help": "Rank of each parallel LoRA."})
    num_loras: int = field(default=4, metadata={"help": "Number of parallel LoRAs per adapted layer."})
    lora_alpha: float = field(default=32, metadata={"help": "Output scale numerator (scale = lora_alpha / r)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "Dropout on the adapter input."})

    def capabilities(self) -> Capabilities:
        return Capabilities(Routing.NONE, Merging.PER_MODEL)

    def __post_init__(self):
        super().__post_init__()
        check_positive("r", self.r)
        check_positive("num_loras", self.num_loras)
        check_dropout(self.lora_dropout)
