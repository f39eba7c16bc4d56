"""Exporting one task of a run: a stock PEFT LoRA folder or a merged model (and a heads model's head)."""

from __future__ import annotations

import difflib
from pathlib import Path

from safetensors.torch import save_file

from ..merge import capabilities_of, export_lora, merge_for_task
from .experiment import RunError
from .heads import MultiTaskClassifier
from .loading import load_run
from .model_card import write_model_card
from .run_folder import EXPORT_DIR


def export_run(run_dir: str | Path, task: str, mode: str, output: str | Path | None = None) -> Path:
    """Export the adapter of one task: ``mode="lora"`` a stock PEFT LoRA folder, ``"merged"`` a merged model.

    A heads model also gets that task's head, as ``head.safetensors`` (``weight``, ``bias``).
    """
    experiment = load_run(run_dir)
    task_id = _task_id(experiment.config.task_names, task, run_dir)
    out = Path(output) if output else Path(run_dir) / EXPORT_DIR / f"{task}-{mode}"
    peft_model = experiment.peft_model
    # None for stock LoRA (and full fine-tuning): the same for every task, exported as it is
    capabilities = None if experiment.full else capabilities_of(peft_model)
    if capabilities is not None:
        peft_model.base_model.check_mergeable()  # refuse an unmergeable method before writing anything
    if experiment.full and mode == "lora":
        raise RunError(
            f"{run_dir} is a full fine-tuning run: it has no adapter to export as LoRA. Use --merged "
            "for the fine-tuned model itself."
        )
    if experiment.full and mode == "merged":
        peft_model.save_pretrained(out)
        experiment.tokenizer.save_pretrained(out)
    elif mode == "lora" and capabilities is not None:
        export_lora(peft_model, task_id, out)
    elif mode == "lora":
        peft_model.save_pretrained(out)
    elif mode == "merged":
        merged = merge_for_task(peft_model, task_id) if capabilities is not None else peft_model.merge_and_unload()
        merged.save_pretrained(out)
        experiment.tokenizer.save_pretrained(out)
    else:
        raise RunError(f"export mode must be 'lora' or 'merged', got {mode!r}.")
    if isinstance(experiment.model, MultiTaskClassifier):
        _save_head(experiment.model, task_id, out / "head.safetensors")
    write_model_card(experiment, task, mode, out, run_dir)
    return out


def _task_id(tasks: list[str], task: str, run_dir) -> int:
    """The index of ``task`` among the run's tasks; an unknown one is named with the closest and all of them."""
    if task in tasks:
        return tasks.index(task)
    close = difflib.get_close_matches(task.lower(), tasks, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise RunError(f"task {task!r} was not trained in {run_dir}.{hint} Its tasks: {', '.join(tasks)}.")


def _save_head(model: MultiTaskClassifier, task_id: int, path: Path) -> None:
    head = model.heads[task_id]
    save_file({"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()}, str(path))
