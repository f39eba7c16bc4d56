"""Gates shared by the routed methods: top-k softmax, the EPT reference's double softmax, and Switch balance.

Every gate maps logits ``z`` (..., E) to dense combine weights ``g`` (..., E) that are zero outside the chosen
experts, so callers can index experts by ``g != 0`` and merge per task by reading one row of ``g``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def topk_softmax(logits: torch.Tensor, k: int, tau: float = 1.0) -> torch.Tensor:
    """g_i = exp(z_i/tau) / sum_{j in TopK(z)} exp(z_j/tau) for i in TopK(z), else 0.

    With ``k`` equal to the number of experts this is a dense softmax.
    """
    if k >= logits.shape[-1]:
        return torch.softmax(logits / tau, dim=-1)
    values, index = logits.topk(k, dim=-1)
    return torch.zeros_like(logits).scatter(-1, index, torch.softmax(values / tau, dim=-1))


def reference_double_softmax(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The public EPT code's gate: p = softmax(z); (v, idx) = topk(p, k); g = softmax(v) on idx."""
    probs = torch.softmax(logits, dim=-1)
    values, index = probs.topk(k, dim=-1)
    return torch.zeros_like(logits).scatter(-1, index, torch.softmax(values, dim=-1))


def switch_balance_loss(router_logits: torch.Tensor, combine: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer load balance: E * sum_i f_i * P_i over the routed tokens.

    ``router_logits`` and ``combine`` are (tokens, E); f_i is the fraction of (token, slot) assignments that go to
    expert i, P_i the mean router probability of expert i. Equals 1 under perfectly uniform routing.
    """
    num_experts = router_logits.shape[-1]
    probs = F.softmax(router_logits, dim=-1).mean(dim=0)
    chosen = (combine != 0).float()
    fraction = chosen.sum(dim=0) / chosen.sum().clamp_min(1.0)
    return num_experts * (fraction * probs).sum()
