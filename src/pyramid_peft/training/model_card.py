"""The README (model card) of an exported task: what the folder holds, how to load it, how to reproduce its score.

``write_model_card`` is called by the export once the folder is written. It also points the exported
``adapter_config.json`` at the base model's hub id (or the name the config gave), never at the local folder an
offline alias resolves to (a path inside a virtual environment, useless on any other machine).

The card's loading snippet uses stock ``transformers`` + ``peft`` for the model; for an encoder it applies the
task's head as training did (mean of the last hidden states over non-pad tokens, then ``weight @ pooled + bias``),
and scores the same evaluation rows ``ept eval`` scores, so running it prints the run's score for the task.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..atomic import atomic_write_text
from ..data.location import DATA_DIR_ENV
from ..merge import capabilities_of, task_factors, truncate
from ..models import ALIASES
from .run_folder import METRICS_FILE

CARD_FILE = "README.md"
# The hub ids of the offline aliases (models.py): what a user elsewhere downloads.
HUB_IDS = {"minilm-l6": "sentence-transformers/all-MiniLM-L6-v2", "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
CANDIDATE_RANKS = (8, 16, 32, 64)


def base_model_id(name: str | None) -> str:
    """The base model as a user elsewhere names it: an alias's hub id, else the configured name."""
    return HUB_IDS.get(name, name) if name else "(built from model.config: no pretrained base)"


def write_model_card(experiment, task: str, mode: str, out: str | Path, run_dir: str | Path) -> Path:
    """Write ``out/README.md`` for the export of ``task`` (``mode`` ``lora`` or ``merged``) from the run folder
    ``run_dir`` (the experiment loaded from it), and fix the exported adapter config's base model name."""
    out, run_dir, config = Path(out), Path(run_dir), experiment.config
    adapter_config = out / "adapter_config.json"
    saved = json.loads(adapter_config.read_text()) if adapter_config.is_file() else None
    if saved is not None and config.model.name:
        saved["base_model_name_or_path"] = base_model_id(config.model.name)
        atomic_write_text(adapter_config, json.dumps(saved, indent=2) + "\n")
    task_id = config.task_names.index(task)
    sections = [
        _header(experiment, task, mode, run_dir, _run_scores(run_dir, task), saved),
        _usage(experiment, task, mode, out),
        _snippet(experiment, task, mode, out),
    ]
    if mode == "lora" and _routed(experiment):
        sections.append(_max_rank_section(experiment, task_id))
    atomic_write_text(out / CARD_FILE, "\n\n".join(sections) + "\n")
    return out / CARD_FILE


def _routed(experiment) -> bool:
    """Whether the export went through ``export_lora`` (its per-task factors can be truncated), as in ``export_run``."""
    return not experiment.full and capabilities_of(experiment.peft_model) is not None


def _run_scores(run_dir: Path, task: str) -> dict | None:
    """The task's entry of the run's ``metrics.json`` (split, examples, metrics), if the run has one."""
    path = run_dir / METRICS_FILE
    return json.loads(path.read_text())["tasks"].get(task) if path.is_file() else None


def _header(experiment, task: str, mode: str, run_dir: Path, scores: dict | None, adapter: dict | None) -> str:
    config = experiment.config
    kind = "a stock PEFT LoRA adapter" if mode == "lora" else "a merged model (the weight change added in)"
    lines = [
        f"# {task}: {config.method.name} on {base_model_id(config.model.name)}",
        "",
        f"Exported by `ept export {run_dir} --task {task} --{mode}` as {kind}.",
        "",
        f"- base model: `{base_model_id(config.model.name)}`"
        + (f" (config alias `{config.model.name}`)" if config.model.name in HUB_IDS else ""),
        f"- task: `{task}` (task id {config.task_names.index(task)} of {len(config.tasks)}: "
        f"{', '.join(config.task_names)})",
        f"- method: `{config.method.name}`, {_rank_line(config.method.options)}"
        + (
            f"; as exported, LoRA rank up to {adapter['r']} per layer (`rank_pattern` in adapter_config.json)"
            if adapter and adapter.get("rank_pattern")
            else ""
        ),
        f"- inputs: at most {config.data.max_source_length} tokens (`data.max_source_length`)",
    ]
    if scores:
        metrics = ", ".join(f"{k} {v:.2f}" for k, v in scores["metrics"].items() if isinstance(v, (int, float)))
        lines.append(f"- score in the run: {metrics} on {scores['num_examples']} `{scores['split']}` examples")
    return "\n".join(lines)


def _rank_line(options: dict) -> str:
    rank = options.get("r")
    return f"rank r = {rank}" if rank is not None else "the method's default rank"


def _usage(experiment, task: str, mode: str, out: Path) -> str:
    if experiment.family == "encoder":
        files = "`head.safetensors` (`weight`, `bias`)" if (out / "head.safetensors").is_file() else "no head file"
        return (
            "## How the head is applied\n\nThe encoder's last hidden states are averaged over the non-pad tokens "
            "(positions where `attention_mask` is 1), and the task's linear head maps that mean to the logits: "
            f"{files}. The prediction is the argmax of the logits (STS-B: the one output, a similarity score). "
            "Sentence pairs are encoded as the tokenizer's pair (`tokenizer(text_a, text_b)`), truncated together."
        )
    spec = _spec(experiment, task)
    if spec.is_generation:
        return (
            "## How answers are read\n\nA generative model: it answers the task's prompt with free text, generated "
            f"greedily (or with {spec.num_beams or 'the run`s'} beams) up to {spec.max_new_tokens} new tokens."
        )
    words = ", ".join(f"`{w}`" for w in spec.label_words) or "the score as text"
    return (
        f"## How answers are read\n\nA generative model: it answers the task's prompt with a label word ({words}), "
        "generated greedily (or, with `data.answer_scoring: likelihood`, the most likely label word; with "
        "`answer_text`, the option whose own text is most likely per character)."
    )


def _snippet(experiment, task: str, mode: str, out: Path) -> str:
    """Loading code that reproduces the score (encoders), or loads the model (generative models)."""
    config = experiment.config
    if experiment.resolved.path is None:
        return (
            "## Loading\n\nThe run's base model was built with random weights from `model.config` (a test model), "
            "so there is no pretrained base to load the export onto."
        )
    base = _base_line(config.model.name)
    imports = ["from pyramid_peft.models import resolve_model"] if config.model.name in ALIASES else []
    if experiment.family != "encoder":
        auto = "AutoModelForSeq2SeqLM" if experiment.family == "seq2seq" else "AutoModelForCausalLM"
        loader = (
            f"PeftModel.from_pretrained({auto}.from_pretrained(base), EXPORT)"
            if mode == "lora"
            else f"{auto}.from_pretrained(EXPORT)"
        )
        return "\n".join(
            [
                "## Loading",
                "",
                "```python",
                "from peft import PeftModel",
                f"from transformers import {auto}",
                *imports,
                base,
                f'EXPORT = "{out.resolve()}"',
                f"model = {loader}",
                "```",
            ]
        )
    data_dir = config.data.data_dir or os.environ.get(DATA_DIR_ENV)
    regression = _spec(experiment, task).is_regression  # one output: the score itself
    entry = config.tasks[config.task_names.index(task)]
    spec_code = f"declare_task({entry!r})" if isinstance(entry, dict) else f'get_task("{task}")'
    split_task = "spec" if isinstance(entry, dict) else f'"{task}"'
    model = (
        "PeftModel.from_pretrained(AutoModel.from_pretrained(base), EXPORT)"
        if mode == "lora"
        else "AutoModel.from_pretrained(EXPORT)"
    )
    code = [
        "import torch",
        "from peft import PeftModel",
        "from safetensors.torch import load_file",
        "from transformers import AutoModel, AutoTokenizer",
        "from pyramid_peft.data import build_splits    # only to fetch the rows `ept eval` scored",
        "from pyramid_peft.metrics import compute_metrics",
        "from pyramid_peft.tasks import get_task",
        "from pyramid_peft.tasks.declare import declare_task",
        *imports,
        "",
        base,
        f'EXPORT = "{out.resolve()}"',
        f'model, head = {model}.eval(), load_file(f"{{EXPORT}}/head.safetensors")',
        "tokenizer = AutoTokenizer.from_pretrained(base)",
        f"spec = {spec_code}",
        f"rows = [spec.to_classification(x) for x in build_splits({split_task}, "
        f'"{config.data.protocol}", {data_dir!r}, max_eval={config.data.max_eval_examples}).eval]',
        "texts_b = [b for _, b, _ in rows] if rows[0][1] is not None else None",
        f"batch = tokenizer([a for a, _, _ in rows], texts_b, padding=True, truncation=True, "
        f'max_length={config.data.max_source_length}, return_tensors="pt")',
        "with torch.no_grad():",
        "    hidden = model(**batch).last_hidden_state",
        'mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)',
        'logits = ((hidden * mask).sum(1) / mask.sum(1)) @ head["weight"].T + head["bias"]',
        "predictions = logits[:, 0].tolist()" if regression else "predictions = logits.argmax(-1).tolist()",
        f'print(compute_metrics("{task}", predictions, [label for _, _, label in rows]))',
    ]
    return "\n".join(
        [
            "## Loading and scoring",
            "",
            "Prints the task's metrics on the evaluation rows the run was scored on (the score above):",
            "",
            "```python",
            *code,
            "```",
        ]
    )


def _spec(experiment, task: str):
    """The run's :class:`TaskSpec` named ``task`` (built in or declared in its config)."""
    return experiment.tasks[experiment.config.task_names.index(task)]


def _base_line(name: str | None) -> str:
    if name in ALIASES:
        return f'base = resolve_model("{name}").path  # the offline copy of {base_model_id(name)} (or that hub id)'
    return f'base = "{name}"'


def _max_rank_section(experiment, task_id: int) -> str:
    """The export's size and the measured error of SVD truncation at a few ranks (``export_lora(max_rank=R)``)."""
    factors = {
        name: (up.detach(), down.detach()) for name, (up, down) in task_factors(experiment.peft_model, task_id).items()
    }
    exact = max(up.shape[1] for up, _ in factors.values())
    rows = [
        "| max_rank | parameters | float32 size | relative error (all layers) | worst layer |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for rank in [r for r in CANDIDATE_RANKS if r < exact] + [exact]:
        params, err, worst = truncation_error(factors, rank)
        rows.append(
            f"| {rank}{' (exact, as exported)' if rank == exact else ''} | {params:,} | "
            f"{params * 4 / 2**20:.1f} MiB | {err:.2e} | {worst:.2e} |"
        )
    return "\n".join(
        [
            "## Smaller exports: `max_rank`",
            "",
            f"Each layer is exported at the exact rank of its weight change (up to {exact} here), so the folder can be "
            "larger than the multi-task adapter it came from. `pyramid_peft.export_lora(model, task_id, out_dir, "
            "max_rank=R)` keeps the best rank-R approximation of every layer (SVD). Measured on this export, as "
            "||ΔW - ΔW_R||_F / ||ΔW||_F:",
            "",
            *rows,
        ]
    )


def truncation_error(factors: dict, rank: int) -> tuple[int, float, float]:
    """(parameters, relative Frobenius error over all layers, worst layer's) of ``max_rank=rank`` truncation.

    The error is ``sqrt(sum_l ||ΔW_l - ΔW_l,R||² / sum_l ||ΔW_l||²)`` with ``ΔW_l = up_l @ down_l``, as
    :func:`pyramid_peft.export_lora` reports it.
    """
    params, err, norm, worst = 0, 0.0, 0.0, 0.0
    for up, down in factors.values():
        keep = min(rank, up.shape[1])
        params += keep * (up.shape[0] + down.shape[1])
        if up.shape[1] > rank:
            _, _, layer_err, layer_norm = truncate(up, down, rank)
        else:
            # ||up @ down||² = trace((upᵀ up)(down downᵀ)): rank x rank products, never the dense matrix
            up64, down64 = up.double(), down.double()
            layer_err, layer_norm = 0.0, float(((up64.T @ up64) * (down64 @ down64.T)).sum())
        err, norm = err + layer_err, norm + layer_norm
        worst = max(worst, (layer_err / layer_norm) ** 0.5 if layer_norm else 0.0)
    return params, (err / norm) ** 0.5 if norm else 0.0, worst
