"""Configuration of MOELoRA (Liu et al., SIGIR 2024)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..capabilities import Capabilities, Merging, Routing
from ..config_base import RoutedConfig, check_dropout, check_positive


@dataclass
class MoeLoraConfig(RoutedConfig):
    """MOELoRA: a task-gated dense mixture of LoRA experts that split one rank-r LoRA.

    Each adapted linear ``W0`` becomes ``W0 + (lora_alpha / r) * sum_i w_i(t) B_i A_i`` for an example of task t:
    expert i has rank ``r / num_experts`` (A_i ~ N(0, 0.01^2), B_i = 0), and the weights come from a per-layer
    task-embedding table and gate, ``w(t) = softmax(W_g e_t)`` with ``W_g`` a ``Linear(task_embedding_dim ->
    num_experts, bias=False)``. The change depends on the task alone, so it merges and exports per task as one LoRA
    of rank r. Every example carries its own task id: mixed-task batches work.

    Defaults follow the official code's run script (``liuqidong07/MOELoRA-peft``: ``experiments/moelora.bash`` and
    ``src/MLoRA/arguments.py``): r=16, 8 experts, lora_alpha=32, dropout 0.1, 64-dimensional task embeddings. The
    table has ``num_tasks`` rows (the official code allocates one spare row). With these settings on T5-base's 192
    adapted modules the expert weights are 811,008 per task over 8 tasks: the "0.81M" of the EPT paper's Table 2.

    Args:
        target_modules: names (or a regex) of the linear layers to adapt.
        num_tasks: number of task ids (rows of each task-embedding table).
        r: total rank, split evenly among the experts; must be divisible by ``num_experts``.
        num_experts: number of LoRA experts per adapted layer.
        lora_alpha: output scale numerator; the scale is ``lora_alpha / r``.
        lora_dropout: dropout on the adapter input.
        task_embedding_dim: width of the per-layer task embeddings fed to the gate.
    """

    r: int = field(default=16, metadata={"help": "Total rank, split evenly among the experts."})
    num_experts: int = field(default=8, metadata={"help": "LoRA experts per adapted layer."})
    lora_alpha: float = field(default=32, metadata={"help": "Output scale numerator (scale = lora_alpha / r)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "Dropout on the adapter input."})
    task_embedding_dim: int = field(default=64, metadata={"help": "Width of the per-layer task embeddings."})

    def capabilities(self) -> Capabilities:
        return Capabilities(Routing.TASK, Merging.PER_TASK)

    def __post_init__(self):
        super().__post_init__()
        check_positive("r", self.r)
        check_positive("num_experts", self.num_experts)
        check_positive("task_embedding_dim", self.task_embedding_dim)
        check_dropout(self.lora_dropout)
        if self.r % self.num_experts:
            raise ValueError(
                f"r={self.r} must be divisible by num_experts={self.num_experts}: the experts split the rank evenly "
                f"(each has rank r / num_experts). Use e.g. r={self.num_experts * max(1, self.r // self.num_experts)}."
            )

    @property
    def expert_rank(self) -> int:
        return self.r // self.num_experts
