"""Parameter accounting in the two ways the EPT lineage reports it (arXiv 2603.12577, Appendix C).

"per task" is total trainable adapter parameters divided by the number of tasks, as MoRE and EPT count. The two
accountings differ in whether routers (gates) and task-embedding tables are included: MoRE's 0.81M/task includes
them, EPT's 0.41M/task does not.
"""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .methods.base import RoutedLayer

GROUPS = ("adapter", "router", "task_embedding")


def count_parameters(model: nn.Module, num_tasks: int | None = None, per_module: bool = False) -> dict:
    """Adapter weights, routers and task embeddings of the active adapter, in total and per task.

    ``num_tasks`` defaults to the adapter config's ``num_tasks`` (1 for configs without one, e.g. stock LoRA).
    Shared tensors (e.g. a model-level router) are counted once.
    """
    totals = dict.fromkeys(GROUPS, 0)
    modules: dict[str, dict[str, int]] = {}
    seen: set[int] = set()
    config = None
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        adapter = module.active_adapters[0]
        config = config or getattr(model, "peft_config", {}).get(adapter)
        counts = layer_parameter_groups(module, adapter, seen)
        modules[name] = counts
        for group, value in counts.items():
            totals[group] += value
    tasks = num_tasks or getattr(config, "num_tasks", None) or 1
    total = sum(totals.values())
    report = {
        **totals,
        "total": total,
        "modules": len(modules),
        "num_tasks": tasks,
        "per_task": total / tasks,
        "per_task_without_router": totals["adapter"] / tasks,
    }
    if per_module:
        report["per_module"] = modules
    return report


def layer_parameter_groups(layer: BaseTunerLayer, adapter: str, seen: set[int] | None = None) -> dict[str, int]:
    """Parameters of ``adapter`` on one tuner layer, by group; tensors whose id is in ``seen`` are skipped.

    Stock PEFT layers (e.g. LoRA) count entirely as adapter weights.
    """
    seen = set() if seen is None else seen
    counts = dict.fromkeys(GROUPS, 0)
    groups = layer.parameter_groups if isinstance(layer, RoutedLayer) else {}
    for container_name in layer.adapter_layer_names:
        container = getattr(layer, container_name, None)
        if container is None or adapter not in container:
            continue
        entry = container[adapter]
        params = [entry] if isinstance(entry, nn.Parameter) else list(entry.parameters())
        for param in params:
            if id(param) not in seen:
                seen.add(id(param))
                counts[groups.get(container_name, "adapter")] += param.numel()
    return counts
