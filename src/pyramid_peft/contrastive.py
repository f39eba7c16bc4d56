"""Token pooling and the contrastive task-embedding loss of the EPT/MoRE lineage (arXiv 2603.12577, eqs. 7-8).

Each adapted module owns a task-embedding table ``E`` (num_tasks x d_in). Its input at one position (or the mean
over the non-pad positions) is a feature ``h_i`` per example, and

    L_cl = CrossEntropy_i( cos(h_i, E_j) / tau over j,  target = task(i) ),

an InfoNCE over tasks whose negatives are the other tasks' rows. The model-level term is the mean over the modules
chosen by :func:`contrastive_module_names` (the encoder's, where the model has one), weighted by λ.

MoRE and EPT use the same loss; these functions are written once so both can import them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .routing import TaskRoute


def token_mean(x: torch.Tensor, mask: torch.Tensor | None, per_example: bool = True) -> torch.Tensor:
    """Mean of ``x`` (batch, [seq,] d) over its positions where ``mask`` (batch, seq) is non-zero.

    ``per_example=True`` gives one row per example (batch, d); ``False`` one mean over the whole batch (d,),
    each real token weighted equally. A 2-D ``x`` has no positions: its rows are their own means.
    """
    if x.dim() == 2:
        return x if per_example else x.mean(dim=0)
    dims = (1,) if per_example else (0, 1)
    if mask is None:
        return x.mean(dim=dims)
    weights = mask.to(x.dtype)[..., None]
    return (x * weights).sum(dim=dims) / weights.sum(dim=dims).clamp_min(1.0)


def pool_features(x: torch.Tensor, pooling: str, route: TaskRoute) -> torch.Tensor:
    """Per-example features of a module input: position 0 (``"first"``, as the reference code) or the mean over
    non-pad positions (``"mean"``; the mask comes from ``route`` when it matches ``x``'s shape)."""
    if x.dim() == 2:
        return x
    if pooling == "first":
        return x[:, 0].contiguous()  # a copy: a view would keep the whole input alive until the next forward
    return token_mean(x, route.token_mask(x))


def task_contrastive_loss(
    features: torch.Tensor, table: torch.Tensor, task_ids: torch.Tensor, tau: float
) -> torch.Tensor:
    """Cross-entropy of cos(h_i, E_j) / tau over the task embeddings E_j, against each example's own task."""
    sims = F.cosine_similarity(features[:, None, :].to(table.dtype), table[None, :, :], dim=-1)
    return F.cross_entropy(sims / tau, task_ids)


def contrastive_module_names(names: list[str], scope: str) -> set[str]:
    """The adapted modules whose inputs feed the loss: all of them (``scope="all"``), or for ``"encoder"`` the
    encoder's modules where the model has an encoder (every module otherwise, e.g. decoder-only models)."""
    in_encoder = {name for name in names if ".encoder." in f".{name}."}
    if scope == "encoder" and in_encoder:
        return in_encoder
    return set(names)
