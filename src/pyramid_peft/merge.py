"""Per-task re-parameterisation: merge a task-routed adapter into the base weights, or export it as plain LoRA.

What is allowed is the adapter's declared :class:`~pyramid_peft.Capabilities`: a per-task adapter merges for the
task asked, a per-model one (MultiLoRA) for any task id with the same result, and one whose change depends on the
input is refused before any work, with the method's reason.

Every method that can state a fixed weight change for a task gives it as LoRA factors through
``RoutedLayer.task_lora_factors`` (``ΔW = B @ A``, scale included). For EPT these are exact by
``S ⊗ K = (B ⊗ K)(A ⊗ I)``, of rank ``r * sum(k_e)`` over the task's chosen kernel sizes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file
from torch import nn

from .atomic import atomic_directory
from .methods.base import RoutedTuner, find_tuners
from .methods.capabilities import Capabilities


def _single_tuner(model: nn.Module) -> RoutedTuner:
    tuners = find_tuners(model)
    if len(tuners) != 1:
        raise ValueError(
            f"expected a model with one pyramid_peft adapter (from get_peft_model), found {len(tuners)} tuners."
        )
    return tuners[0]


def capabilities_of(model: nn.Module) -> Capabilities | None:
    """The declared capabilities of ``model``'s pyramid_peft adapter; None for a model without one (stock PEFT)."""
    return _single_tuner(model).capabilities() if find_tuners(model) else None


def task_factors(model: nn.Module, task_id: int, adapter_name: str | None = None) -> dict[str, tuple]:
    """``{module name: (B, A)}`` for every adapted layer: the exact weight change of ``task_id``."""
    return _single_tuner(model).task_factors(task_id, adapter_name)


def merge_for_task(model: nn.Module, task_id: int, adapter_name: str | None = None, inplace: bool = False):
    """A plain ``transformers`` model whose weights are ``W0 + ΔW(task_id)`` in every adapted layer.

    The routed model is left unchanged unless ``inplace=True`` (which saves a copy of the base model's memory and
    leaves ``model`` unusable; ``model.merge_and_unload(task_id=...)`` gives the same weights the PEFT way).
    Raises ``NotMergeableError`` where the adapter's capabilities do not merge.

    On a quantized (bitsandbytes) base the merged model is a dequantized copy in the base's compute dtype: ``ΔW``
    cannot be added to 4- or 8-bit weights without quantizing it away, so every quantized linear becomes a plain
    one (see :func:`pyramid_peft.models.quantized.dequantized`). For a quantized model to serve, export the task
    with :func:`export_lora` and load it on the same quantized base.
    """
    return _single_tuner(model).merged_model(task_id, adapter_name, inplace=inplace)


def truncate(up: torch.Tensor, down: torch.Tensor, max_rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Best rank-``max_rank`` factors of ``up @ down`` by SVD; returns (up', down', error², norm²) in Frobenius."""
    q_up, r_up = torch.linalg.qr(up.double())
    q_down, r_down = torch.linalg.qr(down.double().T)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T)
    keep = min(max_rank, s.numel())
    new_up = (q_up @ u[:, :keep]) * s[:keep]
    new_down = vh[:keep] @ q_down.T
    return new_up.to(up.dtype), new_down.to(down.dtype), float((s[keep:] ** 2).sum()), float((s**2).sum())


@torch.no_grad()
def export_lora(
    model: nn.Module, task_id: int, out_dir, max_rank: int | None = None, adapter_name: str | None = None
) -> dict:
    """Write ``task_id``'s weight change as a standard PEFT LoRA adapter folder loadable by stock PEFT.

    Each layer's rank is that of its exact factors (``rank_pattern``), with ``lora_alpha`` equal to the rank so
    the LoRA scale is 1. ``max_rank`` truncates each layer by SVD; the report gives the relative Frobenius error
    ``||ΔW - ΔW'|| / ||ΔW||`` over all layers together and the worst layer. The folder is written atomically.
    """
    tuner = _single_tuner(model)
    adapter = adapter_name or tuner.active_adapters[0]
    factors = task_factors(model, task_id, adapter)
    state, ranks, err, norm, worst = {}, {}, 0.0, 0.0, 0.0
    for name, (up, down) in factors.items():
        if max_rank is not None and up.shape[1] > max_rank:
            up, down, layer_err, layer_norm = truncate(up, down, max_rank)
            err, norm = err + layer_err, norm + layer_norm
            worst = max(worst, (layer_err / layer_norm) ** 0.5 if layer_norm else 0.0)
        state[f"base_model.model.{name}.lora_A.weight"] = down.contiguous().cpu()
        state[f"base_model.model.{name}.lora_B.weight"] = up.contiguous().cpu()
        ranks[re.escape(name)] = up.shape[1]
    config = _lora_config(tuner.peft_config[adapter], list(factors), ranks)
    report = {
        "task_id": task_id,
        "layers": len(state) // 2,
        "max_layer_rank": max(ranks.values()),
        "relative_error": (err / norm) ** 0.5 if norm else 0.0,
        "worst_layer_relative_error": worst,
    }
    with atomic_directory(out_dir) as staging:
        config.save_pretrained(staging)
        save_file(state, str(Path(staging) / "adapter_model.safetensors"))
        (Path(staging) / "export_report.json").write_text(json.dumps(report, indent=2))
    return report


def _lora_config(source, module_names: list[str], ranks: dict[str, int]) -> LoraConfig:
    top = max(ranks.values())
    return LoraConfig(
        r=top,
        lora_alpha=top,
        target_modules="^(" + "|".join(re.escape(name) for name in module_names) + ")$",
        rank_pattern=ranks,
        alpha_pattern=dict(ranks),
        lora_dropout=0.0,
        bias="none",
        task_type=source.task_type,
        base_model_name_or_path=source.base_model_name_or_path,
        init_lora_weights=False,
    )
