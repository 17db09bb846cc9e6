import math

import numpy as np
import pytest
import torch

import lowbit_compile  # noqa: F401  (registers the ops)
from lowbit_compile import hadamard
from lowbit_compile.errors import LowbitError

ISSUE_ORDERS = [12, 20, 28, 36, 44, 52, 60, 108, 124, 140, 148]
REAL_SIZES = [384, 1536, 11008, 14336, 18944, 32000, 151936]


def constructible_orders(limit=hadamard.MAX_HADAMARD_ORDER):
    return [k for k in range(4, limit + 1, 4) if hadamard.construction(k) and k & (k - 1)]


def supported_sizes(limit=32768):
    """Every n = K·2^j <= limit with a known Hadamard factor K, grouped by K (each factor built once)."""
    sizes = []
    for k in [1] + constructible_orders():
        n = k
        while n <= limit:
            if n not in sizes:
                sizes.append(n)
            n *= 2
    return sizes


def test_every_construction_up_to_order_1024_is_a_hadamard_matrix():
    orders = constructible_orders()
    assert set(ISSUE_ORDERS) <= set(orders) and 344 in orders and 500 in orders
    for k in orders:
        h = hadamard.hadamard_matrix(k)  # asserts H Hᵀ = k I exactly on construction
        assert set(np.unique(h).tolist()) == {-1, 1}
        hf = h.astype(np.float64)
        assert np.array_equal(hf @ hf.T, k * np.eye(k))


def test_real_model_sizes_get_a_known_hadamard_or_the_kronecker_fallback():
    kinds = {n: hadamard.plan(n).kind for n in REAL_SIZES}
    assert kinds[384].startswith("paley1(q=11)") and kinds[1536].startswith("paley1(q=11)")
    assert kinds[14336] == "paley1(q=27)" and kinds[18944] == "paley2(q=73)"
    assert kinds[11008] == "paley1(q=343)"  # 43·256: 172 itself has no Paley form, 344 = 7³+1 does
    assert kinds[151936].startswith("random_orthogonal")  # 1187·128: no construction known here
    for n in REAL_SIZES:
        p = hadamard.plan(n)
        assert p.factor_size * p.pow2 == n and p.pow2 & (p.pow2 - 1) == 0


def _gram_error(n, dtype=torch.float32, rows=8):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(rows, n, generator=g, dtype=dtype)
    y = hadamard.apply(x, hadamard.random_signs(n, 3).to(dtype), _factor(n, dtype))
    gx, gy = x @ x.T, y @ y.T
    return ((gy - gx).abs().max() / gx.diagonal().max()).item()


def _factor(n, dtype):
    f = hadamard.factor(n)
    return None if f is None else f.to(dtype)


def test_orthonormal_to_1e5_for_every_supported_size_up_to_32768():
    sizes = supported_sizes()
    assert len(sizes) > 300 and 32768 in sizes and 11008 in sizes
    worst = max(_gram_error(n) for n in sizes)
    assert worst < 1e-5


@pytest.mark.parametrize("n", [7, 39 * 4, 43 * 4, 1187 * 2, 3 * 5 * 2])
def test_kronecker_fallback_is_orthonormal(n):
    assert hadamard.plan(n).kind.startswith("random_orthogonal")
    d = hadamard.dense(n)
    assert torch.allclose(d @ d.T, torch.eye(n, dtype=torch.float64), atol=1e-5)


@pytest.mark.parametrize("n", [1, 2, 64, 12, 96, 344, 384, 500, 1000, 7, 172, 2048])
def test_fast_path_matches_the_dense_matrix_and_inverse_undoes_it(n):
    d = hadamard.dense(n)
    assert torch.allclose(d @ d.T, torch.eye(n, dtype=torch.float64), atol=1e-5)
    x = torch.randn(3, 5, n, dtype=torch.float64)
    s = hadamard.random_signs(n, 11).double()
    f = _factor(n, torch.float64)
    y = hadamard.apply(x, s, f)
    # ±1 Hadamard factors are exact; the random orthogonal factor is stored in float32 (orthonormal to ~1e-7)
    tol = 1e-6 if hadamard.plan(n).kind.startswith("random") else 1e-10
    assert torch.allclose(y, (x * s) @ d.T, atol=1e-10)
    assert torch.allclose(hadamard.apply(y, s, f, inverse=True), x, atol=tol)


def test_op_matches_reference_in_float32_and_keeps_dtype():
    n = 384
    x = torch.randn(4, n)
    s = hadamard.random_signs(n, 0)
    f = hadamard.factor(n)
    y = torch.ops.lowbit.hadamard(x, s, f, False)
    ref = (x.double() * s.double()) @ hadamard.dense(n).T
    assert torch.allclose(y.double(), ref, atol=1e-5)
    assert torch.allclose(torch.ops.lowbit.hadamard(y, s, f, True), x, atol=1e-5)
    assert torch.ops.lowbit.hadamard(x.bfloat16(), s, f, False).dtype == torch.bfloat16


def test_sylvester_is_symmetric_so_without_signs_the_transform_is_an_involution():
    x = torch.randn(2, 256, dtype=torch.float64)
    y = hadamard.apply(hadamard.apply(x, None, None), None, None)
    assert torch.allclose(y, x, atol=1e-12)


def test_signs_are_reproducible_from_the_seed():
    assert torch.equal(hadamard.random_signs(100, 5), hadamard.random_signs(100, 5))
    assert not torch.equal(hadamard.random_signs(100, 5), hadamard.random_signs(100, 6))


@pytest.mark.parametrize("n", [64, 96, 7])
def test_opcheck(n):
    x = torch.randn(3, n)
    s = hadamard.random_signs(n, 1)
    f = hadamard.factor(n)
    for inverse in (False, True):
        torch.library.opcheck(torch.ops.lowbit.hadamard.default, (x, s, f, inverse))
        torch.library.opcheck(torch.ops.lowbit.hadamard.default, (x.requires_grad_(), s, f, inverse))
        x = x.detach()


def test_gradient_is_the_transposed_transform():
    n = 96
    x = torch.randn(2, n, dtype=torch.float64, requires_grad=True)
    s = hadamard.random_signs(n, 1).double()
    f = _factor(n, torch.float64)
    torch.autograd.gradcheck(lambda t: torch.ops.lowbit.hadamard(t, s, f, False), (x,))


def test_unsupported_dimension_gets_a_clear_error():
    with pytest.raises(LowbitError, match="odd part 50257 is too large"):
        hadamard.plan(50257)
    with pytest.raises(LowbitError, match="power-of-two"):
        hadamard.fwht(torch.randn(3, 6))
    assert math.isclose(hadamard.dense(12)[0, 0].item() ** 2, 1 / 12, rel_tol=1e-6)


@pytest.mark.parametrize("shape", [(1,), (3, 2), (7, 3, 128), (257, 64), (4, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fwht_buffers_give_the_stacked_butterflies_bits_and_keep_autograd(shape, dtype):
    """fwht writes each stage into a buffer; the values are those of stacking (a + b, a - b) per stage, which is what
    it still does under autograd (block fine-tuning differentiates through it)."""
    def stacked(x):
        n, h = x.shape[-1], 1
        while h < n:
            y = x.reshape(-1, n // (2 * h), 2, h)
            x = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2)
            h *= 2
        return x.reshape(shape)

    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
    out = hadamard.fwht(x)
    assert torch.equal(out, stacked(x)) and out.data_ptr() != x.data_ptr()
    xg = x.clone().requires_grad_(True)
    yg = hadamard.fwht(xg)
    yg.square().sum().backward()
    assert torch.equal(yg.detach(), out) and xg.grad is not None
