"""Learned task embeddings (Figure 2b): PCA to 2-D and pairwise cosine similarity.

The tables are found through the accounting interface (``RoutedLayer.parameter_groups`` names the containers
that hold task embeddings), so every method that learns them is covered: EPT, MoRE, MOELoRA.

One layer (``layer=...``) is analysed as it is: PCA of its raw (T, d) table, as the paper plots one module. Over
several layers (the default: all of them) each layer's rows are scaled to unit length and divided by sqrt(layers),
then concatenated. A task's vector then has unit length, the cosine similarity of two tasks is exactly the mean
of their per-layer cosine similarities, and the PCA shows the same geometry; layers of different widths combine.
"""

from __future__ import annotations

import csv
import difflib
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..methods.base import RoutedLayer
from . import plots


def task_embedding_tables(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every task-embedding table of the active adapter, (T, d) each, by layer name (detached, float32, CPU)."""
    tables = {}
    for module in model.modules():
        if not isinstance(module, RoutedLayer):
            continue
        adapter = module.active_adapters[0]
        for container, group in module.parameter_groups.items():
            entries = getattr(module, container, None)
            if group == "task_embedding" and entries is not None and adapter in entries:
                tables[module.module_key] = _weight(entries[adapter]).detach().float().cpu()
    if not tables:
        raise ValueError(
            "the model has no task-embedding tables: only methods that learn task embeddings (EPT, MoRE, MOELoRA) "
            "can be analysed this way."
        )
    return tables


def _weight(entry) -> torch.Tensor:
    """The table itself: a Parameter, or the weight of a module such as ``nn.Embedding``."""
    return entry if isinstance(entry, torch.Tensor) else entry.weight


def select_layer(tables: dict[str, torch.Tensor], layer: str | None) -> dict[str, torch.Tensor]:
    """All tables, or the one whose name is ``layer`` or ends with it (an error lists close names)."""
    if layer is None:
        return tables
    matches = [name for name in tables if name == layer or name.endswith("." + layer)]
    if len(matches) == 1:
        return {matches[0]: tables[matches[0]]}
    close = difflib.get_close_matches(layer, list(tables), n=3, cutoff=0.3)
    reason = f"matches {len(matches)} layers" if matches else "matches no layer with task embeddings"
    raise ValueError(f"--layer {layer!r} {reason}; give a full name, e.g. {close or list(tables)[:3]}.")


def task_vectors(tables: dict[str, torch.Tensor]) -> np.ndarray:
    """(T, D) vectors of the tasks: one raw table, or the unit-row concatenation over several layers."""
    if len(tables) == 1:
        return next(iter(tables.values())).numpy()
    scale = 1.0 / math.sqrt(len(tables))
    return torch.cat([F.normalize(t, dim=-1) * scale for t in tables.values()], dim=-1).numpy()


def cosine_similarity(vectors: np.ndarray) -> np.ndarray:
    unit = vectors / np.clip(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12, None)
    return unit @ unit.T


def pca_2d(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(T, 2) coordinates on the first two principal components and their explained-variance ratios."""
    from sklearn.decomposition import PCA

    if vectors.shape[0] < 2:
        raise ValueError(f"PCA of task embeddings needs at least 2 tasks, got {vectors.shape[0]}.")
    pca = PCA(n_components=2).fit(vectors)
    return pca.transform(vectors), pca.explained_variance_ratio_


# -- outputs --------------------------------------------------------------------------------------------------
def write_matrix_csv(
    matrix: np.ndarray, rows: list[str], columns: list[str], path: str | Path, corner: str = "task"
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([corner, *columns])
        for name, values in zip(rows, matrix):
            writer.writerow([name, *(f"{v:.6f}" for v in values)])
    return path


def plot_pca(points: np.ndarray, ratios: np.ndarray, task_names: list[str], path: str | Path, title: str) -> Path:
    fig, (ax,) = plots.new_figure(7.0, 5.5)
    plots.labelled_scatter(
        ax,
        points,
        task_names,
        title=title,
        xlabel=f"PC1 ({ratios[0]:.0%} of variance)",
        ylabel=f"PC2 ({ratios[1]:.0%} of variance)",
    )
    return plots.save(fig, path)


def plot_cosine(similarity: np.ndarray, task_names: list[str], path: str | Path, title: str) -> Path:
    fig, (ax,) = plots.new_figure(1.5 + 0.7 * len(task_names), 1.0 + 0.6 * len(task_names))
    plots.heatmap(
        ax,
        similarity,
        task_names,
        task_names,
        title=title,
        xlabel="task",
        ylabel="task",
        colorbar="cosine similarity",
        cmap="coolwarm",
        vmin=-1.0,
        vmax=1.0,
    )
    return plots.save(fig, path)


def analyze_model(
    model: nn.Module, task_names: list[str], output: str | Path, layer: str | None = None, label: str = ""
) -> dict[str, Path]:
    """PCA scatter, cosine-similarity CSV and heatmap of ``model``'s task embeddings, written into ``output``."""
    tables = select_layer(task_embedding_tables(model), layer)
    vectors = task_vectors(tables)
    if vectors.shape[0] != len(task_names):
        raise ValueError(f"the tables have {vectors.shape[0]} task rows but {len(task_names)} task names were given.")
    one = next(iter(tables)) if len(tables) == 1 else None
    where, mean = (one, one) if one else (f"{len(tables)} layers combined", f"mean over {len(tables)} layers")
    out = Path(output)
    points, ratios = pca_2d(vectors)
    similarity = cosine_similarity(vectors)
    prefix = f"{label}: " if label else ""
    return {
        "pca_png": plot_pca(
            points, ratios, task_names, out / "task_embeddings_pca.png", f"{prefix}PCA of task embeddings ({where})"
        ),
        "pca_csv": write_matrix_csv(points, task_names, ["pc1", "pc2"], out / "task_embeddings_pca.csv"),
        "cosine_csv": write_matrix_csv(similarity, task_names, task_names, out / "task_embeddings_cosine.csv"),
        "cosine_png": plot_cosine(
            similarity,
            task_names,
            out / "task_embeddings_cosine.png",
            f"{prefix}task-embedding cosine similarity ({mean})",
        ),
    }


def analyze_run(
    run_dir: str | Path, output: str | Path | None = None, layer: str | None = None, checkpoint: str | None = None
) -> dict[str, Path]:
    """:func:`analyze_model` on a run folder's trained model; output defaults to ``RUN_DIR/analysis``."""
    from ..training.loading import load_run

    experiment = load_run(run_dir, checkpoint)
    out = Path(output) if output else Path(run_dir) / "analysis"
    return analyze_model(
        experiment.model, [t.name for t in experiment.tasks], out, layer, label=experiment.config.method.name
    )
