"""TuckA's model-level router: the scores, the pick, and the route every adapted layer of a forward shares.

Scores (arXiv 2511.06859). For the router input's mean x̄ (d_in) and centroids E_c (k*t x d_in):

    z = E_c x̄  reshaped (k, t),   z_g <- z_g / ||z_g||_2 for each group row,   σ = sigmoid(z).

The pick is ``(g*, j*) = argmax over k*t of σ (+ the ALB bias b, for selection only)`` and the weights are the
chosen group's row ``w = σ[g*]`` (t,), unnormalised. Gradient reaches E_c (and the router input) through w; the
argmax gets none.

The route lives in one :class:`SharedRoute` per tuner, which every layer references: the routing layer writes it,
the others read it. The tuner clears it when a call enters the model, so a layer can never read the route of an
earlier call; it stays in place after the call for the backward pass, so gradient-checkpoint recomputation reuses
it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ...routing import expand_to_batch


@dataclass
class Route:
    """One forward's route: ``group`` () or (batch,), ``weights`` (t,) or (batch, t), the picked expert
    ``g*t + j`` (what the ALB loads count; ``None`` for a pinned route) and the layer that made it."""

    group: torch.Tensor
    weights: torch.Tensor
    expert: torch.Tensor | None = None
    source: nn.Module | None = None


@dataclass
class SharedRoute:
    """Per adapter: the centroid owner (router layer), the current route, and an optional pinned (fixed) route."""

    owners: dict[str, nn.Module] = field(default_factory=dict)
    routes: dict[str, Route] = field(default_factory=dict)
    pinned: dict[str, Route] = field(default_factory=dict)

    def clear(self) -> None:
        """Forget the routes of the previous call (a new call is entering the model)."""
        self.routes.clear()


def routing_scores(centroids: torch.Tensor, features: torch.Tensor, k: int, t: int) -> torch.Tensor:
    """σ (..., k, t): sigmoid of the centroid affinities, each group's row L2-normalised first."""
    z = (features @ centroids.to(features).T).unflatten(-1, (k, t))
    return torch.sigmoid(z / z.norm(dim=-1, keepdim=True))


def select_expert(scores: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Flat index g*t + j (...) of the best of the k*t scores (ALB ``bias`` added for the pick only)."""
    flat = scores.detach().flatten(-2)
    if bias is not None:
        flat = flat + bias.to(flat)
    return flat.argmax(dim=-1)


def group_weights(scores: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """The chosen group's row of ``scores``: (t,) for a batch route, (batch, t) for per-example routes."""
    if group.dim() == 0:
        return scores[group]
    return scores.gather(1, group.view(-1, 1, 1).expand(-1, 1, scores.shape[-1])).squeeze(1)


def dense_weights(group: torch.Tensor, weights: torch.Tensor, k: int, rows: int) -> torch.Tensor:
    """(rows, k*t) combine weights over all experts: the route's w in its group's t slots, zero elsewhere."""
    chosen = F.one_hot(group, k).to(weights)  # (k,) or (batch, k)
    dense = (chosen[..., :, None] * weights[..., None, :]).flatten(-2)
    return dense.expand(rows, -1) if dense.dim() == 1 else expand_to_batch(dense, rows)


def balance_update(bias: torch.Tensor, picks: torch.Tensor, gamma: float) -> None:
    """Loss-free balancing step (in place): b_i += gamma * sign(mean load - load_i), loads counted over ``picks``."""
    load = torch.bincount(picks.reshape(-1), minlength=bias.numel()).to(bias.dtype)
    bias += gamma * torch.sign(load.mean() - load)
