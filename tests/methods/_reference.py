"""Independent float64 references of the task-routed layers, written from the equations of the spec, not the code.

Each function reads a layer's raw tensors (cast to float64) and returns its dense weight change ``ΔW`` (d_out x
d_in) for one task or route, built entry by entry from the definitions: Kronecker products and per-channel kernel
rows for EPT, weighted rank-1 sums for MOELoRA, nested rank prefixes for MoRE, Tucker slices for TuckA. Only the
storage layout (which slice of a flat parameter holds which expert) is shared knowledge with the layers.
"""

from __future__ import annotations

import math

import torch


def _f64(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to(torch.float64)


# -- EPT ------------------------------------------------------------------------------------------------------------
def ept_seed_shape(config, d_out: int, d_in: int, k: int) -> tuple[int, int]:
    if config.expert_form == "kron2d":
        return math.ceil(d_out / k), math.ceil(d_in / k)
    return d_out // k, d_in // k


def ept_gate(config, logits: torch.Tensor) -> torch.Tensor:
    """Dense combine weights (..., E) from logits (..., E), written out per form."""
    if config.gate_form == "code":
        values, index = torch.softmax(logits, -1).topk(config.top_k, dim=-1)
        chosen = torch.softmax(values, -1)
    else:
        values, index = logits.topk(config.top_k, dim=-1)
        chosen = torch.softmax(values / config.router_tau, -1)
    return torch.zeros_like(logits).scatter(-1, index, chosen)


def ept_task_weights(layer, adapter: str = "default") -> torch.Tensor:
    gate = layer.ept_gate[adapter]
    table = _f64(layer.ept_task_embedding[adapter])
    return ept_gate(layer.ept_config[adapter], table @ _f64(gate.weight).T + _f64(gate.bias))


def _tier(prefixes: list[int], total: int) -> torch.Tensor:
    """coord_lin: coordinate c scaled by (1 + #distinct prefix lengths <= c) / #distinct prefix lengths."""
    bounds = sorted(set(prefixes))
    return torch.tensor([(1 + sum(b <= c for b in bounds)) / len(bounds) for c in range(total)], dtype=torch.float64)


def ept_scaled_seed(layer, adapter: str = "default") -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(A, B, {k: (a_offset, b_offset)}) with ALP's dimension-aware scaling applied."""
    config = layer.ept_config[adapter]
    d_out, d_in = layer.out_features, layer.in_features
    A, B = _f64(layer.ept_A[adapter]), _f64(layer.ept_B[adapter])
    sizes = list(dict.fromkeys(config.kernel_sizes))
    shapes = {k: ept_seed_shape(config, d_out, d_in, k) for k in sizes}
    if not config.alp:
        offsets, a, b = {}, 0, 0
        for k in sizes:
            offsets[k] = (a, b)
            a, b = a + shapes[k][1], b + shapes[k][0]
        return A, B, offsets
    offsets = {k: (0, 0) for k in sizes}
    rho = torch.arange(1, config.r + 1, dtype=torch.float64) / config.r
    if config.dim_scale == "rank_sq":
        A = A * (rho**2)[:, None]
    elif config.dim_scale == "rank_lin":
        A = A * rho[:, None]
    elif config.dim_scale == "coord_lin":
        A = A * _tier([shapes[k][1] for k in sizes], A.shape[1])[None, :]
        B = B * _tier([shapes[k][0] for k in sizes], B.shape[0])[:, None]
    return A, B, offsets


def ept_expert_deltas(layer, adapter: str = "default") -> list[torch.Tensor]:
    """ΔW_e (d_out x d_in) of every expert, unscaled: ConvT_{k_e}(S_{k_e}) written out entry by entry."""
    config = layer.ept_config[adapter]
    d_out, d_in = layer.out_features, layer.in_features
    A, B, offsets = ept_scaled_seed(layer, adapter)
    flat = _f64(layer.ept_kernels[adapter])
    deltas, start = [], 0
    for k in config.kernel_sizes:
        m, n = ept_seed_shape(config, d_out, d_in, k)
        a0, b0 = offsets[k]
        S = B[b0 : b0 + m] @ A[:, a0 : a0 + n]
        if config.expert_form == "kron2d":
            K = flat[start : start + k * k].view(k, k)
            start += k * k
            full = torch.zeros(m * k, n * k, dtype=torch.float64)
            for i in range(m):
                for j in range(n):
                    full[i * k : (i + 1) * k, j * k : (j + 1) * k] = S[i, j] * K
            delta = full[:d_out, :d_in]
        else:
            K = flat[start : start + m * k].view(m, k)
            start += m * k
            delta = torch.zeros(d_out, d_in, dtype=torch.float64)
            for c in range(m):
                for j in range(k):
                    delta[c * k + j, :n] = K[c, j] * S[c]
        deltas.append(delta)
    return deltas


def ept_delta(layer, weights: torch.Tensor, adapter: str = "default") -> torch.Tensor:
    """(alpha / r) sum_e g_e ΔW_e for one weight vector g (E,)."""
    config = layer.ept_config[adapter]
    total = sum(g * d for g, d in zip(weights.tolist(), ept_expert_deltas(layer, adapter)))
    return config.lora_alpha / config.r * total


def ept_output(layer, x: torch.Tensor, task_ids: torch.Tensor, adapter: str = "default") -> torch.Tensor:
    """The layer's output for x (batch, ..., d_in) in float64, token by token for token-routed gates."""
    config = layer.ept_config[adapter]
    x = _f64(x)
    deltas = torch.stack(ept_expert_deltas(layer, adapter))  # (E, d_out, d_in)
    scale = config.lora_alpha / config.r
    if config.router_input == "task":
        weights = ept_task_weights(layer, adapter)[task_ids]
        weights = weights.view(x.shape[0], *([1] * (x.dim() - 2)), -1)
    else:
        gate = layer.ept_gate[adapter]
        router_in = x
        if config.router_input == "task+token":
            rows = _f64(layer.ept_task_embedding[adapter])[task_ids]
            router_in = x + rows.view(x.shape[0], *([1] * (x.dim() - 2)), -1)
        weights = ept_gate(config, router_in @ _f64(gate.weight).T + _f64(gate.bias))
    per_expert = torch.einsum("...i,eoi->...eo", x, deltas)
    return base_output(layer, x) + scale * (weights[..., None] * per_expert).sum(-2)


# -- MOELoRA and MoRE -------------------------------------------------------------------------------------------------
def moelora_delta(layer, task: int, adapter: str = "default") -> torch.Tensor:
    """(alpha / r) sum_i w_i(t) B_i A_i with w(t) = softmax(W_g e_t), expert i of rank r / E."""
    config = layer.moelora_config[adapter]
    A, B = _f64(layer.moelora_A[adapter]), _f64(layer.moelora_B[adapter])
    logits = _f64(layer.moelora_gate[adapter].weight) @ _f64(layer.moelora_task_embedding[adapter][task])
    w = torch.softmax(logits, -1)
    q = config.r // config.num_experts
    total = sum(w[i] * B[:, i * q : (i + 1) * q] @ A[i * q : (i + 1) * q] for i in range(config.num_experts))
    return config.lora_alpha / config.r * total


def more_delta(layer, task: int, adapter: str = "default") -> torch.Tensor:
    """(alpha / r) sum_{ρ < rank(c(t))} s_ρ² B[:, ρ] A[ρ], c(t) = argmax softmax(W_g e_t + b_g)."""
    config = layer.more_config[adapter]
    A, B = _f64(layer.more_A[adapter]), _f64(layer.more_B[adapter])
    gate = layer.more_gate[adapter]
    choice = int((_f64(gate.weight) @ _f64(layer.more_task_embedding[adapter][task]) + _f64(gate.bias)).argmax())
    if adapter in layer.more_route_map and int(layer.more_route_map[adapter][task]) >= 0:
        choice = int(layer.more_route_map[adapter][task])
    rank = (choice + 1) * config.r // config.num_experts
    s = [(rho + 1) / config.r if config.rank_scale else 1.0 for rho in range(config.r)]
    total = sum(s[rho] ** 2 * torch.outer(B[:, rho], A[rho]) for rho in range(rank))
    return config.lora_alpha / config.r * total


# -- TuckA --------------------------------------------------------------------------------------------------------
def tucka_route(owner, features: torch.Tensor, adapter: str = "default") -> tuple[int, torch.Tensor]:
    """(g*, w) for one mean input x̄: z = E_c x̄ as (k, t), rows L2-normalised, σ = sigmoid, argmax over k*t."""
    config = owner.tucka_config[adapter]
    z = (_f64(owner.tucka_centroids[adapter]) @ _f64(features)).view(config.k, config.t)
    sigma = torch.sigmoid(z / z.norm(dim=1, keepdim=True))
    group = int(sigma.argmax()) // config.t
    return group, sigma[group]


def tucka_input_map(layer, group: int, weights: torch.Tensor, adapter: str = "default") -> torch.Tensor:
    """alpha Û M̄ Ûᵀ (d_in x d_in): x ↦ x (I + alpha Û M̄ Ûᵀ) before W0."""
    config = layer.tucka_config[adapter]
    core = _f64(layer.tucka_core[adapter][group])
    core = core / core.norm()
    mode = _f64(layer.tucka_mode[adapter])
    mode = mode / mode.norm()
    U = _f64(layer.tucka_factor[adapter])
    U = U / U.norm()
    mixed = sum(weights[j] * sum(mode[j, q] * core[q] for q in range(config.p)) for j in range(config.t))
    return config.alpha * U @ mixed @ U.T


def tucka_delta(layer, group: int, weights: torch.Tensor, adapter: str = "default") -> torch.Tensor:
    """ΔW of a fixed route: W0 (alpha Û M̄ Ûᵀ)ᵀ, so that W_eff x = W0 (x + alpha x Û M̄ Ûᵀ) in row form."""
    return _f64(layer.get_base_layer().weight) @ tucka_input_map(layer, group, weights, adapter).T


# -- shared ---------------------------------------------------------------------------------------------------------
def base_output(layer, x: torch.Tensor) -> torch.Tensor:
    base = layer.get_base_layer()
    out = _f64(x) @ _f64(base.weight).T
    return out + _f64(base.bias) if base.bias is not None else out
