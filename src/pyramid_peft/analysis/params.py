"""Appendix C parameter tables: adapter, router and task-embedding parameters per adapted module and in total.

Models are built on the meta device from their configuration alone: shapes without memory or weights, so a
Llama-2-7b-shaped model costs nothing. ``configs/models/`` keeps the configurations of the paper's two backbones
(``t5-base.json``, ``llama-2-7b.json``); a model name is looked up there first (``t5-base``,
``meta-llama/Llama-2-7b-hf`` and ``google-t5/t5-base`` all find theirs), then resolved as the training pipeline
resolves it (an alias, a local path, or a hub id in the local cache).

Both accountings of the EPT lineage are shown: "no router" counts the weights that make the weight change (as the
EPT paper counts its own method), "all" adds routers and task-embedding tables (as MoRE counts). "Per task" is the total
divided by the number of tasks, as MoRE and EPT report it. Classification heads are not adapter parameters and are
left out.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftConfig, get_peft_model
from tqdm.auto import tqdm

from ..accounting import GROUPS, count_parameters
from ..registry import lookup_method, make_peft_config, method_names
from ..training.config import ConfigError

# The modules the EPT paper adapts (arXiv 2603.12577, Appendix D), used when a model is named without a config.
DEFAULT_TARGETS = {
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
    "bert": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
}
DEFAULT_NUM_TASKS = 8
# MixLoRA adapts whole FFN blocks (its experts) plus LoRA on attention: it keeps its own targets, because FFN
# linears in target_modules are an error for it.
OWN_TARGETS = {"mixlora"}
MODEL_CONFIG_DIRS = (Path("configs/models"), Path(__file__).resolve().parents[3] / "configs" / "models")


@dataclass
class Setting:
    """What a table is computed for: a model configuration, its targets and tasks, and a configured method."""

    label: str
    model_config: object  # a transformers PretrainedConfig
    family: str
    targets: list[str] | str | None
    num_tasks: int
    method: str | None = None  # the experiment config's own method, built with ``method_config``
    method_config: PeftConfig | None = None


def find_model_config(name: str) -> Path | None:
    """``configs/models/<name>.json`` for a model name (``org/`` prefix and ``-hf`` suffix dropped), if kept."""
    stem = name.rstrip("/").rsplit("/", 1)[-1].lower().removesuffix("-hf")
    for folder in MODEL_CONFIG_DIRS:
        if (folder / f"{stem}.json").is_file():
            return folder / f"{stem}.json"
    return None


def resolve_setting(
    config_or_model_name: str, overrides: list[str] | tuple[str, ...] = (), num_tasks: int | None = None
) -> Setting:
    """A setting from an experiment config (``.yaml``) or a model name / config path with the paper's targets."""
    from ..models import resolve_model

    if str(config_or_model_name).endswith((".yaml", ".yml")):
        return _experiment_setting(config_or_model_name, overrides, num_tasks)
    if overrides:
        raise ValueError(f"overrides {list(overrides)} need an experiment config (.yaml), not a model name.")
    path = find_model_config(str(config_or_model_name))
    resolved = resolve_model(str(path or config_or_model_name))
    model_type = resolved.config.model_type
    if model_type not in DEFAULT_TARGETS:
        raise ValueError(
            f"no default target modules for model type {model_type!r}; give an experiment config that sets "
            f"method.target_modules instead (known types: {', '.join(DEFAULT_TARGETS)})."
        )
    return Setting(
        str(config_or_model_name),
        resolved.config,
        resolved.family,
        DEFAULT_TARGETS[model_type],
        num_tasks or DEFAULT_NUM_TASKS,
    )


def _experiment_setting(path: str, overrides, num_tasks: int | None) -> Setting:
    from ..models import resolve_model
    from ..training.config import load_config
    from ..training.experiment import peft_config

    config = load_config(path, overrides)
    section = config.model
    name = section.name and str(find_model_config(section.name) or section.name)
    resolved = resolve_model(name, section.tokenizer, section.config, section.family, section.trust_remote_code)
    tasks = num_tasks or len(config.tasks) or DEFAULT_NUM_TASKS
    own = peft_config(config, resolved.family, tasks)
    method = config.method.name.lower()
    targets = config.method.options.get("target_modules", own.target_modules)  # as written, not PEFT's set
    if method in OWN_TARGETS:  # its targets are attention only: the other methods get the paper's
        targets = DEFAULT_TARGETS.get(resolved.config.model_type, targets)
    return Setting(
        f"{path} ({section.name or resolved.config.model_type})",
        resolved.config,
        resolved.family,
        targets,
        getattr(own, "num_tasks", None) or tasks,
        method,
        own,
    )


def method_config(setting: Setting, method: str) -> PeftConfig:
    """The setting's own method config, or ``method`` with its defaults on the setting's targets and tasks."""
    if method == setting.method:
        return setting.method_config
    options = {} if method in OWN_TARGETS else {"target_modules": setting.targets}
    if lookup_method(method).takes_num_tasks:
        options["num_tasks"] = setting.num_tasks
    return make_peft_config(method, **options)


def build_on_meta(setting: Setting, config: PeftConfig) -> torch.nn.Module:
    """The adapted model, shapes only."""
    from ..models import ResolvedModel, load_model

    resolved = ResolvedModel(None, None, None, setting.family, setting.model_config)
    with torch.device("meta"):
        return get_peft_model(load_model(resolved, "float32", random_init=True), config)


def module_groups(model: torch.nn.Module, per_module: dict[str, dict[str, int]]) -> list[dict]:
    """Adapted modules grouped by shape and counts: ``{"shape", "modules", adapter, router, task_embedding}``.

    Modules of one shape normally count alike; a tensor shared between modules is counted on the first one only,
    which then forms a group of its own, so the groups always add up to the totals.
    """
    modules = dict(model.named_modules())
    groups: dict[tuple, int] = defaultdict(int)
    for name, counts in per_module.items():
        groups[(_shape(modules[name]), *(counts[g] for g in GROUPS))] += 1
    return [{"shape": key[0], "modules": n, **dict(zip(GROUPS, key[1:]))} for key, n in groups.items()]


def _shape(module) -> str:
    """``d_in→d_out``, prefixed with the wrapped module's class when it is not a single linear (MixLoRA's FFNs)."""
    base = module.get_base_layer()
    d_in, d_out = getattr(module, "in_features", None), getattr(module, "out_features", None)
    shape = f"{d_in}→{d_out}" if d_in and d_out else ""
    return shape if isinstance(base, torch.nn.Linear) else f"{type(base).__name__} {shape}".strip()


def method_table(setting: Setting, method: str) -> tuple[list[dict], dict]:
    """(per-module groups, totals of :func:`pyramid_peft.count_parameters`) of one method in ``setting``."""
    model = build_on_meta(setting, method_config(setting, method))
    counts = count_parameters(model, num_tasks=setting.num_tasks, per_module=True)
    return module_groups(model, counts.pop("per_module")), counts


def appendix_c_table(
    config_or_model_name: str,
    methods: list[str] | str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    num_tasks: int | None = None,
) -> str:
    """The Appendix C table as Markdown: per adapted module and in total, with and without routers.

    ``config_or_model_name`` is an experiment config (its model, targets, tasks and method options) or a model
    name / config path (the paper's targets, ``num_tasks`` tasks, default 8). ``methods``: names, or ``"all"``;
    ``None`` means the config's own method, or every method when a model is named.
    """
    setting = resolve_setting(config_or_model_name, overrides, num_tasks)
    chosen = _methods(methods, setting)
    results = {m: method_table(setting, m) for m in tqdm(chosen, desc="building on meta", unit="method")}
    targets = setting.targets
    if not isinstance(targets, str):  # a list keeps its order; PEFT turns a config's list into a set
        targets = ", ".join(targets if isinstance(targets, list) else sorted(targets or []))
    lines = [
        f"## Parameters: {setting.label}, {setting.num_tasks} tasks, targets {targets}",
        "",
        "Adapter = the weights that make the weight change; routers and task-embedding tables are counted apart. "
        'Per task = total / tasks. "per task, no router" counts as the EPT paper does (adapter weights only), '
        '"per task, all" as MoRE does (adapter + routers + task embeddings).',
    ]
    if OWN_TARGETS & set(chosen):
        lines.append("MixLoRA keeps its own targets: LoRA on the attention projections, experts on every FFN block.")
    lines += ["", "### Per adapted module", "", *_module_rows(results), "", "### Totals", "", *_total_rows(results)]
    return "\n".join(lines) + "\n"


def params_command(config_or_model_name: str, tokens: list[str] | tuple[str, ...] = ()) -> str:
    """``ept params CONFIG [--methods NAME... | all] [overrides]``: the table, with ``--methods`` taken out of the
    override tokens (it cannot be an argparse option: the overrides swallow every token after CONFIG)."""
    tokens = list(tokens)
    if "--methods" not in tokens:
        return appendix_c_table(config_or_model_name, overrides=tokens)
    start = tokens.index("--methods") + 1
    end = next((i for i in range(start, len(tokens)) if tokens[i].startswith("--")), len(tokens))
    if end == start:
        raise ConfigError("--methods needs method names or 'all', e.g. --methods ept more lora.")
    return appendix_c_table(config_or_model_name, tokens[start:end], overrides=tokens[: start - 1] + tokens[end:])


def _methods(methods: list[str] | str | None, setting: Setting) -> list[str]:
    if methods is None:
        return [setting.method] if setting.method else method_names()
    if methods == "all" or methods == ["all"]:
        return list(dict.fromkeys([*([setting.method] if setting.method else []), *method_names()]))
    chosen = [m.lower() for m in ([methods] if isinstance(methods, str) else methods)]
    for name in chosen:
        if name not in method_names():
            try:
                make_peft_config(name)
            except ValueError as err:  # the registry's "unknown method" message, with the valid names
                raise ConfigError(f"--methods: {err}") from err
    return chosen


def _module_rows(results: dict) -> list[str]:
    rows = [
        "| method | module (d_in→d_out) | modules | adapter | router | task embedding | total |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for method, (groups, _) in results.items():
        for g in groups:
            total = sum(g[k] for k in GROUPS)
            rows.append(
                f"| {method} | {g['shape']} | {g['modules']} | {g['adapter']:,} | {g['router']:,} | "
                f"{g['task_embedding']:,} | {total:,} |"
            )
    return rows


def _total_rows(results: dict) -> list[str]:
    rows = [
        "| method | modules | adapter | router | task embedding | total | per task, no router | per task, all |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for method, (_, c) in results.items():
        rows.append(
            f"| {method} | {c['modules']} | {c['adapter']:,} | {c['router']:,} | {c['task_embedding']:,} | "
            f"{c['total']:,} | {_per_task(c['per_task_without_router'])} | {_per_task(c['per_task'])} |"
        )
    return rows


def _per_task(value: float) -> str:
    return f"{value:,.0f} ({paper_units(value)})"


def paper_units(value: float) -> str:
    """A count as the paper's tables print it: ``0.41M``, ``9.6K``."""
    return f"{value / 1e6:.2f}M" if value >= 1e5 else f"{value / 1e3:.1f}K"
