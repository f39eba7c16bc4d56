"""Full fine-tuning: the baseline that trains every weight of the model, with no adapter.

``method: {name: full}`` runs through the same pipeline as the adapters (tasks, sampler, heads, schedule,
checkpoints, evaluation), so it is compared with them under one budget. It saves the whole model with
``save_pretrained`` (plus heads for an encoder), and counts every trainable weight of the model as its parameters;
"per task" is that total over the number of tasks, as the EPT lineage reports full fine-tuning (28M per task for
T5-base on 8 tasks).
"""

from __future__ import annotations

from pathlib import Path

from peft import PeftModel
from safetensors.torch import load_file
from torch import nn


def full_parameter_count(model: nn.Module, num_tasks: int) -> dict:
    """Trainable weights of ``model`` (shared tensors once), in :func:`pyramid_peft.count_parameters`'s layout."""
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "adapter": total,
        "router": 0,
        "task_embedding": 0,
        "total": total,
        "num_tasks": num_tasks,
        "per_task": total / num_tasks,
        "per_task_without_router": total / num_tasks,
    }


def load_weights(model: nn.Module, folder: str | Path) -> None:
    """Load what a run saved into ``model``: an adapter folder into a ``PeftModel`` (as its active adapter,
    trainable), or the whole model's weights into a bare model (full fine-tuning)."""
    if not isinstance(model, PeftModel):
        load_full_weights(model, folder)
        return
    adapter = model.active_adapter
    model.load_adapter(str(folder), adapter_name=adapter, is_trainable=True)
    model.set_adapter(adapter)


def load_full_weights(model: nn.Module, folder: str | Path) -> None:
    """Load the weights ``save_pretrained`` wrote into ``folder`` (one file or shards) into ``model``, exactly.

    ``save_pretrained`` writes tied weights (an LM head tied to the embeddings) once, so a key missing from the files
    is accepted only when its tensor is the same object as a loaded one. Anything else missing, and any key the model
    does not have, is refused: the folder belongs to another model.
    """
    files = sorted(Path(folder).glob("model*.safetensors"))
    if not files:
        raise ValueError(
            f"{folder} has no model*.safetensors: it is not the weights folder of a full fine-tuning "
            "run (an adapter run's folder holds adapter_model.safetensors instead)."
        )
    state = {}
    for path in files:
        state.update(load_file(str(path)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tensors = model.state_dict(keep_vars=True)
    loaded = {id(tensors[key]) for key in state if key in tensors}
    untied = [key for key in missing if id(tensors[key]) not in loaded]
    if untied or unexpected:
        raise ValueError(
            f"{folder} does not fit this run's model: missing {untied[:3]}, unexpected "
            f"{unexpected[:3]} (of {len(untied)} and {len(unexpected)}). It was written for another "
            "model."
        )
