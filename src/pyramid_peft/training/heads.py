"""Classification and regression heads on a PEFT-wrapped encoder, one head per task.

Encoder-only models (MiniLM, BERT) cannot generate label words, so GLUE is framed as classification: the
sentence (pair) is encoded, token states are mean-pooled over real (non-pad) tokens, and each example goes through
the head of its own task. STS-B gets a one-output regression head trained with MSE. Batches may mix tasks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.utils import ModelOutput

from ..methods.base import adapter_reads_task_ids
from .full import load_weights

HEADS_FILE = "heads.safetensors"


@dataclass
class MultiTaskOutput(ModelOutput):
    """``logits`` is ``(batch, max labels)``: each row holds its own head's outputs, padded with ``-inf``."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


def forward_takes_task_ids(model: nn.Module) -> bool:
    """Whether ``model``'s forward accepts ``task_ids``: always for heads (they pick the head), else where its
    adapter reads them (:func:`~pyramid_peft.methods.base.adapter_reads_task_ids`; a stock PEFT model's forward
    would reject them). A wrapper (FSDP, DDP: the model is its ``module``) answers for the model inside."""
    inner = model.module if isinstance(getattr(model, "module", None), nn.Module) else model
    return isinstance(inner, MultiTaskClassifier) or adapter_reads_task_ids(inner)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average token states over positions where ``attention_mask`` is 1."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class MultiTaskClassifier(nn.Module):
    """An encoder (usually a ``PeftModel``) and one linear head per task.

    Args:
        encoder: returns ``last_hidden_state``; receives ``task_ids`` where its adapter reads them
            (:func:`~pyramid_peft.methods.base.adapter_reads_task_ids`; stock LoRA's forward would reject them).
        task_names: head order = task id order.
        num_labels: output width per task; 1 means a regression head.
        hidden_size: width of the encoder's states.
        dropout: dropout on the pooled state before the heads.
    """

    def __init__(
        self,
        encoder: nn.Module,
        task_names: list[str],
        num_labels: list[int],
        hidden_size: int,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.encoder = encoder
        self.task_names = list(task_names)
        self.num_labels = list(num_labels)
        # asked once, not in every forward: an adapter's method (and so its answer) does not change
        self.encoder_reads_task_ids = adapter_reads_task_ids(encoder)
        self.dropout = nn.Dropout(dropout)
        self.heads = nn.ModuleList(nn.Linear(hidden_size, n) for n in num_labels)

    @property
    def config(self):
        """The encoder's model config (the Trainer and its callbacks read ``model.config``)."""
        return self.encoder.config

    def activation_checkpointing_enable(self, **kwargs) -> None:
        """Checkpoint the encoder's layers (the Trainer calls this for ``activation_checkpointing: true``)."""
        self.encoder.activation_checkpointing_enable(**kwargs)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        task_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> MultiTaskOutput:
        """Logits (or scores) of each example's own head; with ``labels``, the batch-mean loss."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        if self.encoder_reads_task_ids:
            inputs["task_ids"] = task_ids
        hidden = self.encoder(**inputs).last_hidden_state
        pooled = self.dropout(mean_pool(hidden, attention_mask))
        logits = pooled.new_full((pooled.shape[0], max(self.num_labels)), float("-inf"))
        loss = pooled.new_zeros(()) if labels is not None else None
        for task_id in task_ids.unique().tolist():
            rows = (task_ids == task_id).nonzero(as_tuple=True)[0]
            head = self.heads[task_id]
            out = head(pooled[rows].to(head.weight.dtype))
            logits[rows, : out.shape[1]] = out.to(logits.dtype)
            if labels is not None:
                loss = loss + self._head_loss(task_id, out, labels[rows])
        if loss is not None:
            loss = loss / pooled.shape[0]
        return MultiTaskOutput(loss=loss, logits=logits)

    def _head_loss(self, task_id: int, out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed loss of one head's rows (the caller divides by the batch size)."""
        if self.num_labels[task_id] == 1:
            return F.mse_loss(out.squeeze(-1).float(), labels.float(), reduction="sum")
        return F.cross_entropy(out.float(), labels.long(), reduction="sum")

    def predict(self, logits: torch.Tensor, task_ids: torch.Tensor) -> list[int | float]:
        """Per example: the regression score, or the argmax over its own head's labels."""
        return [
            float(row[0]) if self.num_labels[t] == 1 else int(row[: self.num_labels[t]].argmax())
            for row, t in zip(logits.detach(), task_ids.tolist())
        ]

    # -- saving -----------------------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path, state_dict: dict | None = None, is_main_process: bool = True) -> None:
        """Write the adapter (PEFT ``save_pretrained``; the whole encoder for full fine-tuning) and the heads
        (``heads.safetensors``) into ``folder``.

        ``state_dict`` is a full state dict of this module, as the Trainer gathers it under FSDP / DeepSpeed.
        """
        state_dict = self.state_dict() if state_dict is None else state_dict
        encoder_state = {k[len("encoder.") :]: v for k, v in state_dict.items() if k.startswith("encoder.")}
        self.encoder.save_pretrained(str(folder), state_dict=encoder_state, is_main_process=is_main_process)
        if is_main_process:
            heads = {k: v.detach().cpu().contiguous() for k, v in state_dict.items() if k.startswith("heads.")}
            meta = {"task_names": json.dumps(self.task_names), "num_labels": json.dumps(self.num_labels)}
            save_file(heads, str(Path(folder) / HEADS_FILE), metadata=meta)

    def load_trained(self, folder: str | Path) -> None:
        """Load adapter (or, for full fine-tuning, the whole encoder) and heads written by :meth:`save_pretrained`
        into this (already built) model."""
        folder = Path(folder)
        self.load_heads(folder / HEADS_FILE)
        load_weights(self.encoder, folder)

    def load_heads(self, path: str | Path) -> None:
        """Load ``heads.safetensors``; refuses a file written for other tasks."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            saved = json.loads(handle.metadata()["task_names"])
        if saved != self.task_names:
            raise ValueError(f"{path} holds heads for tasks {saved}, but this model has {self.task_names}.")
        heads = {k[len("heads.") :]: v for k, v in load_file(str(path)).items()}
        self.heads.load_state_dict(heads)
