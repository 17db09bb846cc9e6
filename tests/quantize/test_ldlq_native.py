"""The native LDLQ column loop (kernels/native op `ldlq`) gives the Python loop's codes and loss bit for bit, so
checkpoints do not depend on whether the C++ library could be built."""

import pytest
import torch

from lowbit_compile import formats
from lowbit_compile.errors import LowbitError
from lowbit_compile.kernels import native
from lowbit_compile.quantize import ldlq as L
from lowbit_compile.quantize.quip import mse_scales, quantize_quip

from .test_ldlq import spd_hessian

pytestmark = pytest.mark.skipif(not native.available(), reason=native.unavailable_reason() or "unavailable")


def both(monkeypatch, fn):
    """fn() with the native loop, then with the Python loop."""
    monkeypatch.setenv("LOWBIT_NATIVE_LDLQ", "1")
    assert L.native_loop()
    fast = fn()
    monkeypatch.setenv("LOWBIT_NATIVE_LDLQ", "0")
    assert not L.native_loop()
    return fast, fn()


# odd sizes, blocks that do not divide n, row counts off the BLAS vector width, groups, every code width
@pytest.mark.parametrize("rows,n,bits,group_size,block,dtype", [
    (7, 48, 2, 0, 16, torch.float32), (33, 96, 3, 32, 40, torch.float32), (1, 17, 4, 0, 128, torch.float32),
    (130, 72, 2, 8, 13, torch.float32), (9, 40, 4, 8, 7, torch.float64), (5, 33, 8, 0, 5, torch.float64),
    (200, 128, 3, 0, 128, torch.float32),
])
def test_native_loop_matches_python_bit_for_bit(monkeypatch, rows, n, bits, group_size, block, dtype):
    fmt = formats.int_format(bits)
    for seed in range(2):
        h = spd_hessian(n, seed)
        dh = L.damp_hessian(h)
        ldl = L.LDL(dh.ldl.u.to(dtype), dh.ldl.d)
        w = torch.randn(rows, n, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 0.1
        scales = mse_scales(w.float(), fmt, group_size)
        run = lambda w=w, ldl=ldl, s=scales: L.ldlq_factored(w, ldl, s, fmt, group_size, block)  # noqa: E731
        (c1, l1), (c2, l2) = both(monkeypatch, run)
        assert c1.dtype == torch.uint8 and c1.shape == (rows, n)
        assert torch.equal(c1, c2)
        assert torch.equal(l1, l2)  # float64 loss, the same sums in the same order


def test_native_loop_float64_factor_cast_per_call(monkeypatch):
    """quantize_quip casts U to float32 once; a float64 factor with a float32 weight is cast inside (a copy with
    other strides than the cached view): still the Python loop's result."""
    n, rows = 40, 11
    h = spd_hessian(n, 3)
    ldl = L.damp_hessian(h).ldl  # float64 U
    w = torch.randn(rows, n, generator=torch.Generator().manual_seed(1))
    fmt = formats.int_format(2)
    scales = mse_scales(w, fmt, 0)
    (c1, l1), (c2, l2) = both(monkeypatch, lambda: L.ldlq_factored(w, ldl, scales, fmt, 0, 16))
    assert torch.equal(c1, c2) and torch.equal(l1, l2)


@pytest.mark.parametrize("bits,group_size", [(2, 0), (3, 32), (4, 0)])
def test_quip_record_identical(monkeypatch, bits, group_size):
    """A whole QuIP layer (rotation, scale search over five candidates): the same record either way."""
    n, rows = 96, 70
    h = spd_hessian(n, 5)
    w = torch.randn(rows, n, generator=torch.Generator().manual_seed(2))
    r1, r2 = both(monkeypatch, lambda: quantize_quip(w, h, bits, group_size, seed=4, fqn="m.q"))
    assert torch.equal(r1.qweight, r2.qweight) and torch.equal(r1.scales, r2.scales)
    assert r1.proxy_loss == r2.proxy_loss


def test_native_op_checks_arguments():
    wt = torch.zeros(8, 3)
    ut = torch.eye(8)
    with pytest.raises(RuntimeError, match="share one dtype"):
        torch.ops.lowbit_native.ldlq(wt, ut.double(), torch.ones(8), torch.ones(1, 3), 8, 1.5, 3.0, 4)
    with pytest.raises(RuntimeError, match="per_group"):
        torch.ops.lowbit_native.ldlq(wt, ut, torch.ones(8), torch.ones(3, 3), 8, 1.5, 3.0, 4)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.lowbit_native.ldlq(torch.zeros(3, 8).t(), ut, torch.ones(8), torch.ones(1, 3), 8, 1.5, 3.0, 4)
    with pytest.raises(LowbitError, match="block_size"):
        L.ldlq_factored(torch.zeros(3, 8), L.LDL(ut, torch.ones(8, dtype=torch.float64)), torch.ones(3, 1),
                        formats.int_format(2), 0, 0)
