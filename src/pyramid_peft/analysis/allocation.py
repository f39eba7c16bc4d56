"""Expert allocation: how often each task's inputs are routed to each expert, in every routed layer (Figure 2a).

Routed layers hand their combine weights to ``TaskRoute.observer`` during the forward pass (see
``RoutedLayer.observe_routing``); :class:`AllocationRecorder` is such an observer. Per (layer, task, expert) it
accumulates

* ``rows``: how many rows the layer routed for the task. Task routing reports weights of shape (B, E): one row per
  example. Token routing reports (B, L, E): one row per token, padding excluded when the call's attention mask has
  the layer's (B, L) shape (encoder layers and decoder-only models); other layers (a T5 decoder, whose length is
  the target's) count every token.
* ``selected``: rows whose weight for the expert is non-zero (the expert was among the row's top-k);
* ``weight_sum``: the sum of the expert's weights over those rows.

Tables and figures are pure functions of these counts; :func:`analyze_run` does the whole analysis of a run folder
over its evaluation data.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..methods.base import find_tuners
from ..routing import TaskRoutingError
from . import plots


@dataclass
class LayerAllocation:
    """Routing counts of one layer: ``rows`` (T,), ``selected`` and ``weight_sum`` (T, E), as float64."""

    rows: torch.Tensor
    selected: torch.Tensor
    weight_sum: torch.Tensor

    @classmethod
    def empty(cls, num_tasks: int, num_experts: int) -> LayerAllocation:
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64)  # noqa: E731
        return cls(zeros(num_tasks), zeros(num_tasks, num_experts), zeros(num_tasks, num_experts))

    @property
    def num_experts(self) -> int:
        return self.selected.shape[1]

    def add(self, weights: torch.Tensor, task_ids: torch.Tensor) -> None:
        """Count rows ``weights`` (N, E) of tasks ``task_ids`` (N,)."""
        weights = weights.to("cpu", torch.float64)
        task_ids = task_ids.to("cpu")
        self.rows.index_add_(0, task_ids, torch.ones_like(task_ids, dtype=torch.float64))
        self.selected.index_add_(0, task_ids, (weights != 0).to(torch.float64))
        self.weight_sum.index_add_(0, task_ids, weights)


class AllocationRecorder:
    """Context manager that listens to the routing of ``model`` and counts it per (layer, task, expert).

    ``model`` is anything holding one of this package's tuners (a PeftModel, a tuner, a heads model). Batches run
    inside the ``with`` block must carry ``task_ids``: token-routed methods that do not need them for routing still
    need them here, to know whose tokens they are.
    """

    def __init__(self, model: nn.Module):
        tuners = find_tuners(model)
        if not tuners:
            raise ValueError(
                "the model has no routed adapter (EPT, MoRE, MOELoRA, MixLoRA, HydraLoRA, TuckA): there is no expert "
                "allocation to analyse."
            )
        self.route = tuners[0].route
        self.num_tasks = self.route.num_tasks
        self.layers: dict[str, LayerAllocation] = {}  # in the order the layers first ran
        self._previous = None

    def __enter__(self) -> AllocationRecorder:
        self._previous, self.route.observer = self.route.observer, self
        return self

    def __exit__(self, *exc) -> None:
        self.route.observer = self._previous

    def __call__(self, layer_name: str, weights: torch.Tensor, task_ids: torch.Tensor | None) -> None:
        rows, ids = self._rows(weights, task_ids)
        counts = self.layers.get(layer_name)
        if counts is None:
            counts = self.layers[layer_name] = LayerAllocation.empty(self.num_tasks, weights.shape[-1])
        counts.add(rows, ids)

    def _rows(self, weights: torch.Tensor, task_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, E) rows to count and their task ids: examples for (B, E), non-pad tokens for (B, L, E)."""
        batch = weights.shape[0]
        if task_ids is None:  # a token router that ignores task ids: the call still carries them
            task_ids = self.route.task_ids(batch, weights.device, required=False)
        if task_ids is None:
            raise TaskRoutingError(
                "expert allocation is counted per task: run the model with task_ids=<one id per example>."
            )
        if weights.dim() == 2:
            return weights, task_ids
        ids = task_ids.view(batch, *([1] * (weights.dim() - 2))).expand(weights.shape[:-1])
        keep = torch.ones(weights.shape[:-1], dtype=torch.bool, device=weights.device)
        if weights.dim() == 3:
            mask = self.route.attention_mask(batch, weights.shape[1])
            if mask is not None:
                keep = mask.to(weights.device).bool()
        return weights[keep], ids[keep]


# -- running --------------------------------------------------------------------------------------------------
@torch.no_grad()
def record_allocation(
    model: nn.Module, batches: Iterable[dict], total: int | None = None
) -> dict[str, LayerAllocation]:
    """Run ``model`` in eval mode over ``batches`` (dicts of model inputs with ``task_ids``) and count the routing."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with AllocationRecorder(model) as recorder:
            for batch in tqdm(batches, total=total, desc="routing", unit="batch"):
                model(**{k: v.to(device) for k, v in batch.items()})
    finally:
        model.train(was_training)
    if not recorder.layers:
        raise RuntimeError(
            "no routed layer reported its routing: the method does not call RoutedLayer.observe_routing yet."
        )
    return recorder.layers


# -- tables ---------------------------------------------------------------------------------------------------
def allocation_rows(layers: dict[str, LayerAllocation], task_names: list[str]) -> list[dict]:
    """One record per (layer, task, expert): counts, selection rate and mean gate weights (tasks without rows
    in a layer are left out). Experts are numbered from 1, as in the paper."""
    records = []
    for name, counts in layers.items():
        for task, task_name in enumerate(task_names):
            rows = float(counts.rows[task])
            if rows == 0:
                continue
            for expert in range(counts.num_experts):
                selected, weight = float(counts.selected[task, expert]), float(counts.weight_sum[task, expert])
                records.append(
                    {
                        "layer": name,
                        "task": task_name,
                        "expert": expert + 1,
                        "rows": int(rows),
                        "selected": int(selected),
                        "selection_rate": selected / rows,
                        "mean_weight": weight / rows,
                        "mean_weight_when_selected": weight / selected if selected else 0.0,
                    }
                )
    return records


def task_expert_rates(layers: dict[str, LayerAllocation]) -> tuple[np.ndarray, np.ndarray]:
    """(selection rate, mean gate weight), each (T, E), over all layers: sums over layers over rows over layers.

    Tasks that never ran get NaN.
    """
    experts = {counts.num_experts for counts in layers.values()}
    if len(experts) != 1:
        raise ValueError(f"the routed layers have different numbers of experts {sorted(experts)}; pass one group.")
    rows = sum(c.rows for c in layers.values()).numpy()[:, None]
    selected = sum(c.selected for c in layers.values()).numpy()
    weights = sum(c.weight_sum for c in layers.values()).numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        return selected / rows, weights / rows


def top_experts(layers: dict[str, LayerAllocation]) -> np.ndarray:
    """(T, layers) index of each task's most selected expert per layer (ties: larger total weight); -1 = no rows."""
    columns = []
    for counts in layers.values():
        selected, weights = counts.selected.numpy(), counts.weight_sum.numpy()
        most = selected == selected.max(axis=1, keepdims=True)
        top = np.where(most, weights, -np.inf).argmax(axis=1)
        columns.append(np.where(counts.rows.numpy() > 0, top, -1))
    return np.stack(columns, axis=1)


def write_csv(records: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return path


def summary_rows(layers: dict[str, LayerAllocation], task_names: list[str]) -> list[dict]:
    """One record per (task, expert) over all layers: the numbers behind the tasks x experts heatmap."""
    rates, weights = task_expert_rates(layers)
    return [
        {"task": task, "expert": e + 1, "selection_rate": float(rates[t, e]), "mean_weight": float(weights[t, e])}
        for t, task in enumerate(task_names)
        if not np.isnan(rates[t]).all()
        for e in range(rates.shape[1])
    ]


# -- figures --------------------------------------------------------------------------------------------------
def plot_experts(
    layers: dict[str, LayerAllocation], task_names: list[str], path: str | Path, expert_labels: list[str], title: str
) -> Path:
    """Tasks x experts heatmaps over all layers: selection rate and mean gate weight, each coloured over its own
    range of values, with a caption that says what a cell counts (:func:`selection_caption`)."""
    rates, weights = task_expert_rates(layers)
    fig, (left, right) = plots.new_figure(max(10.0, 1.4 * len(expert_labels) + 4), 2.8 + 0.45 * len(task_names), 2)
    common = dict(xlabel="expert", ylabel="task")
    plots.heatmap(left, rates, task_names, expert_labels, title="selection rate", colorbar="selection rate", **common)
    plots.heatmap(
        right,
        weights,
        task_names,
        expert_labels,
        title="mean gate weight (0 where not selected)",
        colorbar="mean gate weight",
        **common,
    )
    fig.suptitle(title)
    plots.caption(fig, selection_caption(layers))
    return plots.save(fig, path)


def selection_caption(layers: dict[str, LayerAllocation]) -> str:
    """What a selection-rate cell counts, read off the counts: with task routing every row of a task takes the same
    experts in a layer, so the rate is the share of layers that pick the expert; a row sums to the experts each
    input gets (top_k)."""
    rates, _ = task_expert_rates(layers)
    sums = np.nansum(rates[~np.isnan(rates).all(axis=1)], axis=1)
    task_level = all(bool(((c.selected == 0) | (c.selected == c.rows[:, None])).all()) for c in layers.values())
    counted = (
        f"share of the {len(layers)} layers whose router picks the expert for the task (task routing: "
        "all of a task's inputs take the same experts in a layer)"
        if task_level
        else "share of the task's routed rows (examples, or tokens for token routing) over all layers whose "
        "top-k includes the expert"
    )
    low, high = (float(sums.min()), float(sums.max())) if sums.size else (0.0, 0.0)
    total = f"{low:g}" if np.isclose(low, high) else f"{low:g}-{high:g}"
    return (
        f"Selection rate = {counted}. Each row sums to {total}: the experts every input uses (top_k). "
        "Mean gate weight = the expert's combine weight averaged over the same rows. Colours span each map's "
        "own range."
    )


def plot_layers(
    layers: dict[str, LayerAllocation], task_names: list[str], path: str | Path, expert_labels: list[str], title: str
) -> Path:
    """Layers x tasks map of each task's most selected expert, one layer per row so every name reads upright."""
    names = short_layer_names(list(layers))
    label_room = 0.075 * max(len(n) for n in names)  # the layer names stand left of the grid
    fig, (ax,) = plots.new_figure(3.5 + label_room + 0.7 * len(task_names), 2.2 + 0.2 * len(names))
    plots.category_heatmap(
        ax,
        top_experts(layers).T,
        names,
        task_names,
        expert_labels,
        title=title,
        xlabel="task",
        ylabel="adapted layer (execution order)",
        colorbar="most selected expert",
    )
    plots.caption(
        fig,
        "Cell: the expert the task's inputs select most often in that layer (ties: the larger total "
        "gate weight); white: the task had no inputs.",
    )
    return plots.save(fig, path)


def short_layer_names(names: list[str]) -> list[str]:
    """Layer names without the prefix every name shares (``base_model.model.encoder.layer.``...)."""
    if len(names) < 2:
        return names
    parts = [name.split(".") for name in names]
    shared = 0
    while all(len(p) > shared + 1 and p[shared] == parts[0][shared] for p in parts):
        shared += 1
    return [".".join(p[shared:]) for p in parts]


def expert_labels(model: nn.Module, num_experts: int) -> list[str]:
    """``E1``, ``E2``, ... with EPT's kernel sizes (``E1 k=2``) where the adapter config has them."""
    kernels = getattr(_adapter_config(model), "kernel_sizes", None)
    if kernels is not None and len(kernels) == num_experts:
        return [f"E{e + 1} k={k}" for e, k in enumerate(kernels)]
    return [f"E{e + 1}" for e in range(num_experts)]


def _adapter_config(model: nn.Module):
    tuner = find_tuners(model)[0]
    return tuner.peft_config[tuner.active_adapters[0]]


# -- a run folder ---------------------------------------------------------------------------------------------
def eval_batches(
    experiment, split: str = "eval", max_examples: int | None = None, batch_size: int | None = None
) -> tuple[Iterator[dict], int, list[str]]:
    """(batches, number of batches, task names) of a run's evaluation data, collated as evaluation collates it."""
    from ..training.experiment import collators, eval_sets, load_splits

    _, collator = collators(experiment)
    size = batch_size or experiment.config.training_arguments().per_device_eval_batch_size
    sets = eval_sets(experiment, load_splits(experiment), use_test=split == "test")
    features = [
        [{"task_id": s.task_id, "task": s.task.name, "example": ex} for ex in s.examples[:max_examples]] for s in sets
    ]
    chunks = [task[start : start + size] for task in features for start in range(0, len(task), size)]
    return (collator(chunk) for chunk in chunks), len(chunks), [t.name for t in experiment.tasks]


def analyze_run(
    run_dir: str | Path,
    output: str | Path | None = None,
    split: str = "eval",
    checkpoint: str | None = None,
    max_examples: int | None = None,
    batch_size: int | None = None,
) -> dict[str, Path]:
    """Count a run's routing over its evaluation data; write the CSVs and the two heatmaps into ``output``
    (default ``RUN_DIR/analysis``). Returns the written paths by kind."""
    from ..training.loading import load_run

    experiment = load_run(run_dir, checkpoint)
    batches, total, tasks = eval_batches(experiment, split, max_examples, batch_size)
    layers = record_allocation(experiment.model, batches, total)
    out = Path(output) if output else Path(run_dir) / "analysis"
    labels = expert_labels(experiment.model, next(iter(layers.values())).num_experts)
    method = experiment.config.method.name
    return {
        "by_layer_csv": write_csv(allocation_rows(layers, tasks), out / "allocation_by_layer.csv"),
        "csv": write_csv(summary_rows(layers, tasks), out / "allocation.csv"),
        "experts_png": plot_experts(
            layers,
            tasks,
            out / "allocation_experts.png",
            labels,
            f"{method}: expert allocation per task over {len(layers)} layers ({split} data)",
        ),
        "layers_png": plot_layers(
            layers,
            tasks,
            out / "allocation_layers.png",
            labels,
            f"{method}: most selected expert per task and layer ({split} data)",
        ),
    }
