"""Weighted sums of LoRA pieces: the computation MultiLoRA, MOELoRA and HydraLoRA share.

A layer with n pieces keeps their factors stacked along the rank: ``down`` = [A_1; ...; A_n] (n*q x d_in) and
``up`` = [B_1 ... B_n] (d_out x n*q), each piece of rank q. For piece weights w (fixed scalars, one vector per
example, or one per token),

    sum_i w_i B_i A_i x = up @ concat_i(w_i * A_i x),

so a mixture costs two matrix products with an elementwise weighting between them, and with fixed weights it is
one LoRA of rank n*q whose up factor has the weights folded in (what merging and export need). HydraLoRA's heads
share one A; its hidden state has a single piece row that broadcasts over the n heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mix_pieces(hidden: torch.Tensor, weights: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """sum_i w_i B_i h_i.

    Args:
        hidden: (..., n, q) the pieces' down projections h_i = A_i x, or (..., 1, q) when the pieces share one A.
        weights: piece weights, broadcastable to (..., n).
        up: (d_out, n*q), the pieces' up factors side by side.
    """
    return F.linear((hidden * weights.unsqueeze(-1)).flatten(-2), up)


def fold_weights(up: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``up`` with piece i's columns scaled by ``weights[i]``, so ``fold_weights(up, w) @ down = sum_i w_i B_i A_i``."""
    piece_rank = up.shape[1] // weights.shape[0]
    return up * weights.repeat_interleave(piece_rank)[None, :]
