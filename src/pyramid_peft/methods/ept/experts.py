"""The deconvolution experts of EPT as low-rank factors, and their literal (materialised) forms.

Notation (arXiv 2603.12577; docs/ept.md): seed factors A (r x n) and B (m x r) give the seed S = B A (m x n).

``kron2d`` (the paper's form). A transposed convolution with one channel, a k x k kernel K and stride k tiles
scaled copies of K without overlap, so ConvT_k(S) = S ⊗ K (Kronecker product). With ``I_k`` the identity,

    S ⊗ K = (B ⊗ K)(A ⊗ I_k),

so an expert is a LoRA of rank r*k with factors ``B ⊗ K`` (mk x rk) and ``A ⊗ I_k`` (rk x nk): applying it costs
r*k*(d_in + d_out) per token and never builds the d_out x d_in matrix. Rows with different kernels share the
factors ``B ⊗ I_k`` and ``A ⊗ I_k`` and differ only in between, ``B ⊗ K = (B ⊗ I_k)(I_r ⊗ K)``
(:func:`row_kernels`). Dimensions not divisible by k use ceil + crop: m = ceil(d_out/k), n = ceil(d_in/k), and the
result is cropped to d_out x d_in.

``code1d`` (the public reference code's form). Expert k reads only the first n = floor(d_in/k) inputs, forms
s = S x with S = B[:m] A[:, :n], m = floor(d_out/k), and expands every seed channel c into k outputs with its own
kernel row: y[c*k + j] = K[c, j] s[c]; rows past m*k are zero. Its factors are
``B' = vec(K)[:, None] * repeat_rows(B[:m], k)`` (zero-padded to d_out rows) and ``A' = A[:, :n]`` (zero-padded to
d_in columns), a LoRA of rank r.

Experts of the same kernel size share their seed slice, and both forms are linear in the kernel, so a weighted sum
of same-size experts is one expert with the weighted sum of their kernels.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def seed_shape(d_out: int, d_in: int, k: int, form: str) -> tuple[int, int]:
    """(m, n): the seed size an expert of kernel ``k`` needs for a d_out x d_in layer."""
    if form == "kron2d":
        return ceil_div(d_out, k), ceil_div(d_in, k)
    return d_out // k, d_in // k


def kernel_numel(d_out: int, k: int, form: str) -> int:
    """Parameters of one expert kernel: k*k (kron2d) or floor(d_out/k)*k (code1d)."""
    return k * k if form == "kron2d" else (d_out // k) * k


def kron2d_factors(A: torch.Tensor, B: torch.Tensor, K: torch.Tensor, d_out: int, d_in: int):
    """LoRA factors (B ⊗ K, A ⊗ I_k), cropped to (d_out, rk) and (rk, d_in); ``K`` may carry leading batch dims.

    With batched ``K`` (..., k, k) the up factor is batched too: (..., d_out, rk).
    """
    return kron2d_up(B, K, d_out), kron2d_down(A, K.shape[-1], d_in)


def kron2d_up(B: torch.Tensor, K: torch.Tensor, d_out: int) -> torch.Tensor:
    """The up factor ``B ⊗ K`` cropped to d_out rows: (..., d_out, rk) for kernels (..., k, k)."""
    return batched_kron(B, K)[..., :d_out, :]


def kron2d_down(A: torch.Tensor, k: int, d_in: int) -> torch.Tensor:
    """The down factor ``A ⊗ I_k`` cropped to d_in columns: (rk, d_in)."""
    return torch.kron(A, identity(k, A.dtype, A.device))[:, :d_in]


def dilated_down(x: torch.Tensor, A: torch.Tensor, k: int, d_in: int) -> torch.Tensor:
    """``(A ⊗ I_k) x`` for rows x (tokens, d_in) without building the factor: a 1-D convolution of each row with
    A's rows dilated by k, ``h[t, ρk + q] = Σ_j A[ρ, j] x[t, jk + q]``, r·d_in multiply-adds per token instead of
    the factor's r·k·d_in. Rows are zero-padded to n·k where ceil + crop cut the factor's columns at d_in."""
    n = A.shape[1]
    if n * k > d_in:
        x = F.pad(x, (0, n * k - d_in))
    return F.conv1d(x.reshape(-1, 1, n * k), A[:, None, :], dilation=k).flatten(1)


# A CPU convolution call has a fixed cost of about 60 µs, some 3M multiply-adds of a matrix product, and runs its
# multiply-adds at about half the speed of one (one core; benchmarks/serving.py measures both ways): the dilated
# form pays where it saves at least this many of the factor's multiply-adds.
DILATED_MIN_SAVING = 4_000_000


def dilated_pays(tokens: int, d_in: int, rank: int, k: int) -> bool:
    """Whether the dilated form of ``A ⊗ I_k`` (rank rows of A) is the cheaper one for ``tokens`` rows on the CPU:
    the multiply-adds it saves, counting its own r·d_in twice (it runs them at half speed), reach
    ``DILATED_MIN_SAVING``."""
    return tokens * d_in * rank * (k - 2) >= DILATED_MIN_SAVING


class KronDown:
    """A kron2d group's down factor ``A ⊗ I_k`` (cropped to d_in columns) applied to blocks of rows: as the
    dilated convolution (:func:`dilated_down`) on the CPU without autograd where :func:`dilated_pays` (the
    convolution's backward is slower than the product's), else as one
    product with the factor, built on first use."""

    def __init__(self, A: torch.Tensor, k: int, d_in: int):
        self.A, self.k, self.d_in = A, k, d_in
        self._factor: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // x.shape[-1]
        if (
            x.device.type == "cpu"
            and not torch.is_grad_enabled()
            and dilated_pays(tokens, self.d_in, self.A.shape[0], self.k)
        ):
            return dilated_down(x, self.A, self.k, self.d_in)
        if self._factor is None:
            self._factor = kron2d_down(self.A, self.k, self.d_in)
        return F.linear(x, self._factor)


def row_kernels(hidden: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """``(I_r ⊗ K) h`` for hidden states (..., r, k) (h read row by row): ``H Kᵀ``, with kernels ``K``
    (R, 1, ..., 1, k, k) one per example of the R rows, or (..., k, k) one per token."""
    if K.shape[:-2] == hidden.shape[:-2]:
        return torch.matmul(hidden, K.transpose(-1, -2))
    rows, k = K.shape[0], K.shape[-1]
    mixed = torch.bmm(hidden.reshape(rows, -1, k), K.reshape(rows, k, k).transpose(1, 2))
    return mixed.view(hidden.shape)


def block_diagonal(kernels: list[torch.Tensor]) -> torch.Tensor:
    """Per-row block-diagonal matrices (rows, S, S) from each group's row kernels (rows, k_g, k_g)."""
    size = sum(K.shape[-1] for K in kernels)
    out = kernels[0].new_zeros(kernels[0].shape[0], size, size)
    start = 0
    for K in kernels:
        k = K.shape[-1]
        out[:, start : start + k, start : start + k] = K
        start += k
    return out


class GatheredPyramid:
    """Several kron2d groups run in one pass from the Kronecker structure, one kernel per row.

    With x read per group as X_g (n_g x k_g), group g is ``B_g (A_g X_g) K_g,rowᵀ``. Each forward copies every
    group's X_gᵀ side by side into one zero-padded buffer (S x n_total, S = sum of k_g; a group's rows stay zero
    outside its seed columns), so one product with the whole seed A gives every group's hidden states (S x r),
    one per-row block-diagonal matrix (rows, S, S) applies the kernels, one product with B gives every group's
    output (S x m_total), and each group's block is added back transposed. Only the seed and the kernels are
    read, never a factor of rank r times the kernel sizes, in 2G + 5 operations (G + 4 where the layer before
    gathered the same input, as k and v after q): what decoding steps (a few tokens, every weight read per step)
    pay for. Built once per ``generate`` call and used without autograd; the buffers of single-token steps and
    their views are made once per call and layout and shared by every step and every layer of that layout. A
    prompt (many tokens per row) runs group by group instead, from views of x, without buffers that grow with
    the tokens.

    ``layout`` holds (k, a_offset, n, b_offset, m) per group, ``mix`` the (rows, S, S) kernels.
    """

    def __init__(self, A, B, mix, layout, d_in: int, d_out: int, steps: dict | None = None):
        self.A, self.B_t, self.mix, self.layout, self.d_in, self.d_out = A, B.mT, mix, layout, d_in, d_out
        self.padded_in = max(k * n for k, _, n, _, _ in layout)
        self.padded_out = max(k * m for k, _, _, _, m in layout)
        # Step buffers, shared through ``steps`` (one call's): the gathered input by the pyramids of one input
        # layout, the outputs by those of one output layout. They stay in the processor's cache from layer to
        # layer instead of each layer touching its own.
        self._steps = {} if steps is None else steps
        self._by_shape: dict[torch.Size, tuple[_GatheredInput, _GatheredOutput, torch.Tensor]] = {}
        self._group_views: list[tuple] | None = None

    def add_to(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result`` plus the groups' change of ``x`` (rows, ..., d_in; read in the seed's dtype), in place where
        ``result`` has the seed's dtype."""
        lead = x.shape[:-1]
        if lead[1:].numel() > 1:  # a prompt: its gathered buffers would be many tokens times the seed's width
            return self._add_group_by_group(x, result)
        found = self._by_shape.get(lead)
        if found is None:
            found = self._by_shape[lead] = self._step_buffers(x)
        inputs, outputs, mix = found
        hidden = F.linear(inputs.gather(x), self.A)  # (rows, ..., S, r)
        torch.matmul(torch.matmul(mix, hidden), self.B_t, out=outputs.outputs)  # (rows, ..., S, m_total)
        (first, first_block), *rest = outputs.adds
        first.copy_(first_block)  # covers the d_out outputs read below
        for out, block in rest:
            out.add_(block)
        return self._add_change(result, outputs.out)

    def _step_buffers(self, x: torch.Tensor) -> tuple[_GatheredInput, _GatheredOutput, torch.Tensor]:
        """The shared buffers for x's shape (made by the first pyramid of their layout to need them) and the row
        kernels viewed to broadcast over x's tokens."""
        lead, seed = x.shape[:-1], (tuple(self.A.shape), self.A.dtype, self.A.device)
        key = ("in", tuple((k, a, n) for k, a, n, _, _ in self.layout), self.d_in, lead, seed)
        inputs = self._steps.get(key)
        if inputs is None:
            inputs = self._steps[key] = _GatheredInput(self, lead)
        key = ("out", tuple((k, b, m) for k, _, _, b, m in self.layout), self.d_out, lead, seed, self.B_t.shape)
        outputs = self._steps.get(key)
        if outputs is None:
            outputs = self._steps[key] = _GatheredOutput(self, lead)
        spread = [1] * (len(lead) - 1)  # over the tokens of a row
        return inputs, outputs, self.mix.view(self.mix.shape[0], *spread, *self.mix.shape[1:])

    def _add_group_by_group(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """The same change group by group from views of ``x`` (rows, tokens, d_in), each product over all of a
        row's tokens: hidden states laid out (rows, k, tokens, r), so one batched product per row applies its
        kernel and one matrix product gives the outputs, added back transposed."""
        rows = x.shape[0]
        inputs = x.to(self.A.dtype).reshape(rows, -1, self.d_in)
        tokens = inputs.shape[1]
        out = inputs.new_empty(rows, tokens, self.padded_out)
        for index, (k, n, m, A_t, B_t, kernels) in enumerate(self._groups()):
            padded = F.pad(inputs, (0, n * k - self.d_in)) if n * k > self.d_in else inputs
            hidden = torch.matmul(padded.view(rows, tokens, n, k).permute(0, 3, 1, 2), A_t)
            mixed = torch.bmm(kernels, hidden.view(rows, k, -1)).view(rows, k, tokens, -1)
            outputs = torch.matmul(mixed, B_t).permute(0, 2, 3, 1)  # (rows, tokens, m, k)
            target = out[..., : m * k].view(rows, tokens, m, k)
            if index == 0:  # every group's m * k covers d_out: the first group writes what is read below
                target.copy_(outputs)
            else:
                target.add_(outputs)
        return self._add_change(result, out[..., : self.d_out].view(*x.shape[:-1], self.d_out))

    def _groups(self) -> list[tuple]:
        """Per group: k, n, m, its slices of the seed (A_gᵀ, B_gᵀ) and its row kernels (views, made once)."""
        if self._group_views is None:
            self._group_views, slot = [], 0
            for k, a_offset, n, b_offset, m in self.layout:
                self._group_views.append(
                    (
                        k,
                        n,
                        m,
                        self.A[:, a_offset : a_offset + n].mT,
                        self.B_t[:, b_offset : b_offset + m],
                        self.mix[:, slot : slot + k, slot : slot + k],
                    )
                )
                slot += k
        return self._group_views

    def _add_change(self, result: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
        if result.dtype == change.dtype:
            return result.add_(change)
        return result + change.to(result.dtype)


class _GatheredInput:
    """A step's input gathered for the groups of one input layout (S x n_total per token), and the views its
    copies go through. It remembers the input it last gathered: layers that read the same input in a row (a
    block's q, k and v projections) gather it once while it is unchanged."""

    def __init__(self, pyramid: GatheredPyramid, lead: torch.Size):
        seed = pyramid.A  # buffers in the seed's dtype
        padded = seed.new_zeros(*lead, pyramid.padded_in)  # zeros past d_in (ceil) stay
        self.input = padded[..., : pyramid.d_in]
        size = sum(k for k, *_ in pyramid.layout)
        self.gathered = seed.new_zeros(*lead, size, seed.shape[1])  # zeros outside each group's block stay
        self.copies, slot = [], 0
        for k, a_offset, n, _, _ in pyramid.layout:
            block = padded[..., : n * k].unflatten(-1, (n, k)).mT
            self.copies.append((self.gathered[..., slot : slot + k, a_offset : a_offset + n], block))
            slot += k
        self.source: tuple[torch.Tensor, int] | None = None

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        if self.source is not None and self.source[0] is x and self.source[1] == x._version:
            return self.gathered
        self.input.copy_(x)
        for gathered, block in self.copies:
            gathered.copy_(block)
        self.source = (x, x._version)  # held, so its identity cannot pass to another tensor
        return self.gathered


class _GatheredOutput:
    """A step's per-group outputs (S x m_total per token) for one output layout, the views that add each group's
    block back transposed, and the summed change (d_out)."""

    def __init__(self, pyramid: GatheredPyramid, lead: torch.Size):
        seed = pyramid.A
        size = sum(k for k, *_ in pyramid.layout)
        self.outputs = seed.new_empty(*lead, size, pyramid.B_t.shape[1])
        out = seed.new_empty(*lead, pyramid.padded_out)
        self.out = out[..., : pyramid.d_out]
        self.adds, slot = [], 0
        for k, _, _, b_offset, m in pyramid.layout:
            outputs = self.outputs[..., slot : slot + k, b_offset : b_offset + m].mT
            self.adds.append((out[..., : m * k].unflatten(-1, (m, k)), outputs))
            slot += k


def code1d_apply(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, K: torch.Tensor, d_out: int) -> torch.Tensor:
    """A code1d expert on ``x`` (..., d_in): the seed map on the first n inputs, each of its m outputs expanded by
    its kernel row; ``K`` (..., m, k) broadcastable over x's leading dims; rows past m*k are zero."""
    m, k = K.shape[-2:]
    seed_out = F.linear(F.linear(x[..., : A.shape[1]].contiguous(), A), B)  # (..., m)
    return F.pad((seed_out[..., None] * K).flatten(-2), (0, d_out - m * k))


@lru_cache(maxsize=64)
def identity(k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """I_k, built once per size, dtype and device (it is rebuilt in every forward otherwise)."""
    return torch.eye(k, dtype=dtype, device=device)


def batched_kron(B: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """kron(B, K) for a matrix B (m x r) and kernels K (..., k, k): result (..., m*k, r*k)."""
    m, r = B.shape
    k = K.shape[-1]
    lead = K.shape[:-2]
    out = B[:, None, :, None] * K[..., None, :, None, :]  # (..., m, k, r, k)
    return out.reshape(*lead, m * k, r * k)


def code1d_factors(A: torch.Tensor, B: torch.Tensor, K: torch.Tensor, d_out: int, d_in: int):
    """LoRA factors of a code1d expert: up (..., d_out, r) with the kernel folded in, down (r, d_in).

    ``A`` is (r, n) and ``B`` is (m, r) already sliced to this kernel size; ``K`` is (..., m, k).
    """
    m, k = K.shape[-2:]
    up = K.reshape(*K.shape[:-2], m * k, 1) * B.repeat_interleave(k, dim=0)  # (..., m*k, r)
    up = F.pad(up, (0, 0, 0, d_out - m * k))
    down = F.pad(A, (0, d_in - A.shape[1]))
    return up, down


# -- literal forms: the test reference and the "as the paper describes it" benchmark ---------------------------
def literal_kron2d(S: torch.Tensor, K: torch.Tensor, d_out: int, d_in: int) -> torch.Tensor:
    """ConvTranspose2d(1, 1, k, stride=k, bias=False) applied to the seed image S, cropped to d_out x d_in."""
    k = K.shape[-1]
    out = F.conv_transpose2d(S[None, None], K[None, None], stride=k)[0, 0]
    return out[:d_out, :d_in]


def literal_code1d(S: torch.Tensor, K: torch.Tensor, d_out: int, d_in: int) -> torch.Tensor:
    """The reference's grouped 1-D transposed convolution, as a dense d_out x d_in matrix.

    Every input column of the seed is a length-1 signal on m channels; channel c is expanded by its own kernel row
    K[c] (groups = m, stride k) into outputs c*k .. c*k+k-1. Rows past m*k and columns past n stay zero.
    """
    m, k = K.shape
    n = S.shape[1]
    expanded = F.conv_transpose1d(S.T[:, :, None], K[:, None, :], stride=k, groups=m)  # (n, m, k)
    dense = S.new_zeros(d_out, d_in)
    dense[: m * k, :n] = expanded.reshape(n, m * k).T
    return dense
