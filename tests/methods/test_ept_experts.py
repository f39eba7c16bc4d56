"""The deconvolution identities in float64: transposed convolution = Kronecker product = the factored path."""

import pytest
import torch
from torch import nn

from pyramid_peft.methods.ept import experts

pytestmark = pytest.mark.usefixtures("float64_default")  # float64 identities (conftest)


def reference_kron(S, K):
    """kron(S, K) written out entry by entry: Y[i*k + p, j*k + q] = S[i, j] K[p, q]."""
    m, n = S.shape
    k = K.shape[0]
    Y = torch.zeros(m * k, n * k)
    for i in range(m):
        for j in range(n):
            Y[i * k : (i + 1) * k, j * k : (j + 1) * k] = S[i, j] * K
    return Y


@pytest.mark.parametrize("k", [1, 2, 3, 4, 6, 8])
def test_conv_transpose2d_module_equals_kronecker_product(k):
    torch.manual_seed(k)
    S, K = torch.randn(5, 7), torch.randn(k, k)
    conv = nn.ConvTranspose2d(1, 1, kernel_size=k, stride=k, bias=False)
    conv.weight.data = K[None, None].clone()
    literal = conv(S[None, None])[0, 0]
    torch.testing.assert_close(literal, reference_kron(S, K), rtol=0, atol=1e-12)
    torch.testing.assert_close(experts.literal_kron2d(S, K, 5 * k, 7 * k), reference_kron(S, K), rtol=0, atol=1e-12)


@pytest.mark.parametrize("d_out,d_in,k", [(24, 16, 2), (24, 16, 4), (26, 15, 4), (25, 17, 6), (11, 30, 8)])
def test_kron2d_factors_equal_cropped_kronecker(d_out, d_in, k):
    """(B ⊗ K)(A ⊗ I) = (BA) ⊗ K, cropped: ceil + crop for dimensions not divisible by k."""
    torch.manual_seed(0)
    r = 3
    m, n = experts.seed_shape(d_out, d_in, k, "kron2d")
    assert (m, n) == (-(-d_out // k), -(-d_in // k))
    A, B, K = torch.randn(r, n), torch.randn(m, r), torch.randn(k, k)
    up, down = experts.kron2d_factors(A, B, K, d_out, d_in)
    assert up.shape == (d_out, r * k) and down.shape == (r * k, d_in)
    expected = reference_kron(B @ A, K)[:d_out, :d_in]
    torch.testing.assert_close(up @ down, expected, rtol=0, atol=1e-12)
    x = torch.randn(4, d_in)
    torch.testing.assert_close(x @ down.T @ up.T, x @ expected.T, rtol=0, atol=1e-12)


@pytest.mark.parametrize("d_in,k", [(16, 2), (16, 4), (15, 4), (17, 6), (30, 8), (5, 8)])
def test_dilated_down_applies_the_cropped_down_factor(d_in, k):
    """The dilated convolution gives x (A ⊗ I_k)ᵀ with the factor cropped to d_in columns (float64, 1e-12), for
    inputs of any leading shape."""
    torch.manual_seed(0)
    A = torch.randn(3, experts.seed_shape(4, d_in, k, "kron2d")[1], dtype=torch.float64)
    x = torch.randn(2, 7, d_in, dtype=torch.float64)
    expected = x.reshape(-1, d_in) @ experts.kron2d_down(A, k, d_in).T
    torch.testing.assert_close(experts.dilated_down(x, A, k, d_in), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("grad", [False, True])
def test_kron_down_takes_the_convolution_only_without_autograd_on_the_cpu(grad, monkeypatch):
    """KronDown applies the cropped factor either way (float64, 1e-12); the convolution where it saves enough
    multiply-adds and no gradient is needed, the product with the factor otherwise (its backward is faster)."""
    torch.manual_seed(0)
    A = torch.randn(3, 4, dtype=torch.float64, requires_grad=grad)
    x = torch.randn(5, 15, dtype=torch.float64)
    expected = x @ experts.kron2d_down(A, 4, 15).T
    calls = []
    monkeypatch.setattr(experts, "dilated_down", lambda *a, _f=experts.dilated_down: calls.append(1) or _f(*a))
    for min_saving, conv_expected in [(0, not grad), (10**12, False)]:
        monkeypatch.setattr(experts, "DILATED_MIN_SAVING", min_saving)
        calls.clear()
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(experts.KronDown(A, 4, 15)(x), expected, rtol=0, atol=1e-12)
        assert bool(calls) == conv_expected


def test_batched_kernels_give_batched_factors():
    torch.manual_seed(0)
    A, B, K = torch.randn(2, 4), torch.randn(3, 2), torch.randn(5, 2, 2)
    up, down = experts.kron2d_factors(A, B, K, 6, 8)
    for b in range(5):
        torch.testing.assert_close(up[b] @ down, reference_kron(B @ A, K[b]), rtol=0, atol=1e-12)


def reference_code1d(S, K, d_out, d_in):
    """ΔW[c*k + j, i] = K[c, j] S[c, i] for i < n, zero elsewhere (the public code's form, docs/ept.md)."""
    m, k = K.shape
    n = S.shape[1]
    W = torch.zeros(d_out, d_in)
    for c in range(m):
        for j in range(k):
            W[c * k + j, :n] = K[c, j] * S[c]
    return W


@pytest.mark.parametrize("d_out,d_in,k", [(24, 16, 2), (26, 15, 4), (25, 17, 6), (30, 11, 8)])
def test_code1d_factors_and_grouped_conv_equal_block_form(d_out, d_in, k):
    """floor + pad: the grouped 1-D transposed convolution and the rank-r factors give the same block matrix."""
    torch.manual_seed(1)
    r = 3
    m, n = experts.seed_shape(d_out, d_in, k, "code1d")
    assert (m, n) == (d_out // k, d_in // k)
    A, B, K = torch.randn(r, n), torch.randn(m, r), torch.randn(m, k)
    expected = reference_code1d(B @ A, K, d_out, d_in)
    torch.testing.assert_close(experts.literal_code1d(B @ A, K, d_out, d_in), expected, rtol=0, atol=1e-12)
    up, down = experts.code1d_factors(A, B, K, d_out, d_in)
    assert up.shape == (d_out, r) and down.shape == (r, d_in)
    torch.testing.assert_close(up @ down, expected, rtol=0, atol=1e-12)


def test_kernel_parameter_counts():
    assert experts.kernel_numel(768, 6, "kron2d") == 36
    assert experts.kernel_numel(768, 6, "code1d") == 768
    assert experts.kernel_numel(4096, 6, "code1d") == 4092


@pytest.mark.parametrize("d_out,d_in", [(24, 24), (26, 15), (11, 30)])
def test_gathered_pyramid_prompt_and_decoding_steps_equal_the_kronecker_experts(d_out, d_in):
    """Groups of kernel sizes 2, 3 and 4 with one kernel per row: a prompt (group by group) and single-token steps
    (the gathered pass, its buffers shared with a second pyramid of the same layout, an input read by both gathered
    once until it changes in place) all add, per row, sum_g kron(B_g A_g, K_g,row) x, cropped (entry-by-entry
    reference, 1e-12)."""
    torch.manual_seed(0)
    r, rows, sizes = 2, 3, (2, 3, 4)
    layout, a_offset, b_offset = [], 0, 0
    for k in sizes:
        m, n = experts.seed_shape(d_out, d_in, k, "kron2d")
        layout.append((k, a_offset, n, b_offset, m))
        a_offset, b_offset = a_offset + n, b_offset + m
    steps = {}  # one call's buffers
    pyramids, deltas = [], []
    for _ in range(2):
        A, B = torch.randn(r, a_offset), torch.randn(b_offset, r)
        kernels = [torch.randn(rows, k, k) for k in sizes]
        mix = experts.block_diagonal(kernels)
        pyramids.append(experts.GatheredPyramid(A, B, mix, tuple(layout), d_in, d_out, steps))
        deltas.append(
            [
                sum(
                    reference_kron(B[b : b + m] @ A[:, a : a + n], K[row])[:d_out, :d_in]
                    for (k, a, n, b, m), K in zip(layout, kernels)
                )
                for row in range(rows)
            ]
        )

    def check(pyramid, delta, x):
        result = torch.randn(rows, x.shape[1], d_out)
        expected = result + torch.stack([x[row] @ delta[row].T for row in range(rows)])
        torch.testing.assert_close(pyramid.add_to(x, result.clone()), expected, rtol=0, atol=1e-12)

    for tokens in (5, 1, 1):
        for pyramid, delta in zip(pyramids, deltas):
            check(pyramid, delta, torch.randn(rows, tokens, d_in))
    x = torch.randn(rows, 1, d_in)  # one input read by both (as q and k read theirs): gathered once
    for pyramid, delta in zip(pyramids, deltas):
        check(pyramid, delta, x)
    x.mul_(-2.0)  # changed in place: gathered again
    for pyramid, delta in zip(pyramids, deltas):
        check(pyramid, delta, x)
    assert len(steps) == 2  # the single-token steps of both pyramids used one input and one output buffer set
