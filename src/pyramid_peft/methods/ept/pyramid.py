"""The layout of an EPT layer's pyramid: kernel groups, seed sizes, kernel offsets and ALP's dimension-aware scales.

Experts of one kernel size form a group that shares its seed slice. With ALP every group slices a prefix of one
seed sized for the smallest kernel; without it every kernel size owns a separate seed block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import experts
from .config import EptConfig


@dataclass(frozen=True)
class KernelGroup:
    """The experts of one kernel size: where their seed slice and kernels sit in the layer's parameters."""

    k: int
    experts: tuple[int, ...]
    a_offset: int  # first seed column in A
    b_offset: int  # first seed row in B
    m: int  # seed rows (output side)
    n: int  # seed columns (input side)


def plan_groups(config: EptConfig, d_out: int, d_in: int) -> tuple[list[KernelGroup], int, int, list[int]]:
    """Kernel groups, the factor sizes (rows of B, columns of A) and each expert's kernel offset.

    With ALP every group slices a prefix of one seed sized for the smallest kernel; without it every kernel size
    owns a separate seed block.
    """
    sizes = list(dict.fromkeys(config.kernel_sizes))
    shapes = {k: experts.seed_shape(d_out, d_in, k, config.expert_form) for k in sizes}
    groups, a_off, b_off = [], 0, 0
    for k in sizes:
        m, n = shapes[k]
        members = tuple(e for e, size in enumerate(config.kernel_sizes) if size == k)
        groups.append(KernelGroup(k, members, 0 if config.alp else a_off, 0 if config.alp else b_off, m, n))
        a_off, b_off = a_off + n, b_off + m
    if config.alp:
        m_total, n_total = shapes[min(sizes)]
    else:
        m_total, n_total = b_off, a_off
    numels = [experts.kernel_numel(d_out, k, config.expert_form) for k in config.kernel_sizes]
    offsets = [sum(numels[:e]) for e in range(len(numels))]
    return groups, m_total, n_total, offsets


def alp_scales(config: EptConfig, groups: list[KernelGroup], m_total: int, n_total: int):
    """ALP's dimension-aware scaling (eq. 6 of 2603.12577, reconstructed): (A-row, A-column, B-row) scales.

    ``rank_sq`` scales rank component ρ by ρ/r on both factors, i.e. (ρ/r)² on A alone; ``rank_lin`` by ρ/r
    once; ``coord_lin`` scales seed coordinates by tier on both sides.
    """
    rank = torch.arange(1, config.r + 1, dtype=torch.float64) / config.r  # cast to the factors' dtype at use
    if not config.alp or config.dim_scale == "none":
        return None
    if config.dim_scale == "rank_sq":
        return (rank**2, None, None)
    if config.dim_scale == "rank_lin":
        return (rank, None, None)
    return (None, tier_scale([g.n for g in groups], n_total), tier_scale([g.m for g in groups], m_total))


def tier_scale(prefix_lengths: list[int], total: int) -> torch.Tensor:
    """Seed-coordinate scale for ``dim_scale='coord_lin'``: coordinates shared by every kernel size get 1/T,
    those used by fewer groups more, up to 1 for the coordinates only the smallest kernel reaches."""
    bounds = sorted(set(prefix_lengths))
    scale = torch.empty(total, dtype=torch.float64)
    start = 0
    for tier, end in enumerate(bounds, start=1):
        scale[start:end] = tier / len(bounds)
        start = end
    return scale
