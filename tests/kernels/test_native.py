"""lowbit_native ops (kernels/native): packing, `linear` against a float64 reference on every code path this CPU
runs, instruction-set dispatch, opcheck and torch.compile.

Tolerances, per output y_n, with u = 2⁻²⁴ (float32 unit roundoff) and Ŵ the reference weights (c − zero)·s:

- act="float" and the prefill (decode + sgemm) path compute Σ_k Ŵ[n,k]·x_k with Ŵ decoded exactly as the
  reference (one float32 rounding of (c − zero)·s, which the float64 reference repeats) and a float32 sum of K
  products. Whatever the order of the sum, |error| ≤ γ_K · Σ_k |Ŵ[n,k] x_k| with γ_K = K·u/(1 − K·u) (Higham,
  Accuracy and Stability, §3.1); we allow (K + 2)·u·Σ|Ŵx|.
- act="int8" computes Ŵ·x̂ where x̂ = d·q is x rounded to the int8 grid of its block of 32 (d = max|x|/127,
  q = round(x·127/max|x|)): the integer products are exact, then float32 sums follow. Two checks:
  1. against the float64 Ŵ·x̂ (x̂ rebuilt here the same way): float32 summation only, but the zero enters as
     −zero·Σx̂ per group, so the sums run over s·c·x̂ and s·zero·x̂ separately and the bound is
     (K + 8)·u·Σ_k s_k(c_k + zero)|x̂_k|. This check is tight: a 1 % scale error fails it
     (test_int8_check_catches_a_one_percent_scale_error).
  2. against the float64 Ŵ·x: |x̂_k − x_k| ≤ d/2 (1 + 4·127·u) (the rounding of the step, of x·127/max|x| and of
     d·q), so |error| ≤ Σ_k |Ŵ[n,k]|·d_k/2·(1 + 10⁻⁴) + the float32 term above. It is a worst case, about √K
     looser than the typical error, which a 1 % scale error does not exceed on random data; check 1 is the
     one that can catch it.

`hadamard` (y = c·(F ⊗ H_P)(s ⊙ x), n = K·P, L = log₂P) against hadamard.apply in float64. Each output is a sum
of K·P terms c·F[a, b]·(±z[b, i]) with z = s ⊙ x (sign flips exact). The fast Walsh–Hadamard transform sums the P
terms of a row in a tree of depth L, the factor's product adds K more roundings per term (K − 1 additions and the
product; with FMA fewer), the scale one, and the scale c itself and, for an int8 factor, the float32 F_K = H/√K the
reference holds differ from the exact values by one rounding each. Any order of such a sum errs by at most
γ_d·Σ|terms| with d the roundings a term goes through (Higham, Accuracy and Stability, §4.2), so
|y − ŷ|[a, j] ≤ γ_{L+K+3} · c · Σ_b |F[a, b]| · Σ_i |z[b, i]|, the same for every j (transposed: Fᵀ, z = x).
Worst case, √n-ish above the typical error; a 10⁻⁴ scale error or one flipped factor sign fails it.
"""

import os
import subprocess
import sys

import pytest
import torch

from lowbit_compile import formats
from lowbit_compile.kernels import native

pytestmark = pytest.mark.skipif(not native.available(), reason=native.unavailable_reason() or "unavailable")

U = 2.0**-24
OPS = torch.ops.lowbit_native if native.available() else None
ISAS = native.supported_isas() if native.available() else []
# (N, K, groups): odd N; K with padding (300), whole-unit groups (512/4 = 128), and groups ending inside a
# 128-input unit (288/9 = 32, 288/3 = 96)
SHAPES = [(37, 300, 1), (19, 512, 4), (37, 288, 9), (13, 288, 3)]


@pytest.fixture(autouse=True)
def _threads_and_seed(one_thread):
    torch.manual_seed(0)
    yield


def _zero(bits):
    return formats.int_format(bits).zero


def _layer(n, k, groups, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, generator=g)
    scales = torch.rand(n, groups, generator=g) * 0.1 + 0.01
    return codes, scales


def _weights64(codes, scales, bits):
    """Ŵ in float64 from the float32 rounding of (c − zero)·s, as formats.dequantize computes it."""
    k = codes.shape[1]
    s = scales.repeat_interleave(k // scales.shape[1], dim=1)
    return ((codes.to(torch.float32) - _zero(bits)) * s).double()


def _int8_activations(x):
    """x̂ = d·q as the kernel quantizes (per block of 32, zero padding), float64."""
    m, k = x.shape
    kp = -(-k // 32) * 32
    xb = torch.nn.functional.pad(x, (0, kp - k)).view(m, kp // 32, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    d = amax / 127
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, 0.0)  # `127 / amax` is 127·(1/amax) in torch
    q = torch.round(xb * inv)
    return (d.double() * q.double()).view(m, kp)[:, :k], d.double().expand(m, kp // 32, 32).reshape(m, kp)[:, :k]


def _float_bound(x, w):
    k = x.shape[1]
    return (k + 2) * U * (x.double().abs() @ w.abs().t())


def _run(x, codes, scales, bits, act, isa, prefill_rows=0):
    n, k = codes.shape
    packed = native.pack(codes, bits)
    return OPS.linear(x, packed, scales, bits, _zero(bits), n, k, act, prefill_rows, isa)


# ----------------------------------------------------------------------------------------------- packing


def _pack_reference(codes, bits):
    """The layout of csrc/lowbit_native.h, spelled out in torch: units of 128 codes, 16·bits bytes each."""
    n, k = codes.shape
    kp = -(-k // 128) * 128
    c = torch.nn.functional.pad(codes, (0, kp - k)).view(n, kp // 128, 4, 32).to(torch.int32)  # [.., block i, j]
    if bits == 4:
        lo, hi = c[:, :, 0::2], c[:, :, 1::2]  # blocks 0, 2 in the low nibbles; 1, 3 in the high ones
        units = (lo | hi << 4).reshape(n, kp // 128, 64)
    else:
        plane = sum((c[:, :, i] & 3) << (2 * i) for i in range(4))  # (n, units, 32)
        units = plane
        if bits == 3:
            high = (c >> 2).view(n, kp // 128, 4, 2, 16)  # [i, h, b]: code 32i + 16h + b
            hb = sum(high[:, :, i, h] << (2 * i + h) for i in range(4) for h in range(2))
            units = torch.cat([plane, hb], dim=-1)
    return units.reshape(n, kp // 8 * bits).to(torch.uint8)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("shape", [(1, 1), (3, 127), (5, 129), (7, 300), (2, 1000), (0, 64)])
def test_pack_unpack_round_trip_is_exact_and_follows_the_documented_layout(bits, shape):
    codes = torch.randint(0, 1 << bits, shape, dtype=torch.uint8)
    packed = OPS.pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (shape[0], -(-shape[1] // 128) * 16 * bits)
    assert torch.equal(packed, _pack_reference(codes, bits))
    assert torch.equal(OPS.unpack(packed, bits, *shape), codes)
    padded = -(-shape[1] // 128) * 128  # padding holds code 0
    assert not OPS.unpack(packed, bits, shape[0], padded)[:, shape[1]:].any()


def test_pack_and_unpack_reject_bad_arguments():
    with pytest.raises(RuntimeError, match="a code is 4"):
        OPS.pack(torch.full((2, 8), 4, dtype=torch.uint8), 2)
    with pytest.raises(RuntimeError, match="supported widths"):
        OPS.pack(torch.zeros(2, 8, dtype=torch.uint8), 5)
    with pytest.raises(RuntimeError, match="2-D uint8"):
        OPS.pack(torch.zeros(2, 8, dtype=torch.int32), 2)
    with pytest.raises(RuntimeError, match=r"packed must be uint8 \(2, 32\)"):
        OPS.unpack(torch.zeros(2, 30, dtype=torch.uint8), 2, 2, 100)


# ----------------------------------------------------------------------------------------------- linear


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m", [1, 3, 64, 300])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_float_mode_and_prefill_match_the_reference_to_float32_rounding(bits, shape, m, isa):
    n, k, groups = shape
    codes, scales = _layer(n, k, groups, bits, seed=bits)
    x = torch.randn(m, k)
    w = _weights64(codes, scales, bits)
    ref = x.double() @ w.t()
    bound = _float_bound(x, w)
    for prefill_rows in (0, 1):  # the fused decode kernel; the decode + sgemm path
        y = _run(x, codes, scales, bits, "float", isa, prefill_rows)
        assert y.shape == (m, n) and y.dtype == torch.float32
        assert ((y.double() - ref).abs() <= bound).all(), (prefill_rows, ((y.double() - ref).abs() / bound).max())


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m", [1, 3, 64, 300])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_int8_mode_is_w_times_quantized_x_within_the_derived_bounds(bits, shape, m, isa):
    n, k, groups = shape
    codes, scales = _layer(n, k, groups, bits, seed=bits)
    x = torch.randn(m, k) * torch.rand(1, k) * 3  # channels of different size, as in real activations
    y = _run(x, codes, scales, bits, "int8", isa).double()
    w = _weights64(codes, scales, bits)
    xq, step = _int8_activations(x)
    s = scales.double().repeat_interleave(k // groups, dim=1)
    float_part = (k + 8) * U * (xq.abs() @ (s * (codes.double() + _zero(bits))).t())
    assert ((y - xq @ w.t()).abs() <= float_part).all()  # check 1: Ŵ·x̂ to float32 rounding
    quant_part = (step / 2 * (1 + 1e-4)) @ w.abs().t()
    assert ((y - x.double() @ w.t()).abs() <= quant_part + float_part).all()  # check 2: the step bound vs Ŵ·x


def test_int8_check_catches_a_one_percent_scale_error():
    bits, (n, k, groups) = 2, SHAPES[1]
    codes, scales = _layer(n, k, groups, bits)
    x = torch.randn(4, k)
    y = _run(x, codes, scales * 1.01, bits, "int8", "auto").double()
    xq, _ = _int8_activations(x)
    s = scales.double().repeat_interleave(k // groups, dim=1)
    float_part = (k + 8) * U * (xq.abs() @ (s * (codes.double() + _zero(bits))).t())
    err = (y - xq @ _weights64(codes, scales, bits).t()).abs()
    assert (err > float_part).float().mean() > 0.9


def test_int8_relative_error_on_gaussian_activations_is_a_fraction_of_a_percent():
    """K = 4096, one scale per row: ‖y_int8 − y_float‖ / ‖y_float‖ ≈ (step/√12)/σ ≈ max|x|/(127·√12·σ) per
    element, about 0.6 % for Gaussian blocks of 32 (max|x| ≈ 2.5σ)."""
    n, k = 64, 4096
    for bits in (2, 3, 4):
        codes, scales = _layer(n, k, 1, bits)
        x = torch.randn(8, k)
        ref = _run(x, codes, scales, bits, "float", "auto")
        rel = float((_run(x, codes, scales, bits, "int8", "auto") - ref).norm() / ref.norm())
        assert 1e-3 < rel < 1e-2, (bits, rel)


def test_a_zero_that_is_not_the_grid_default_and_leading_dimensions():
    codes, scales = _layer(21, 256, 2, 3)
    x = torch.randn(2, 5, 256)
    packed = OPS.pack(codes, 3)
    w = ((codes.to(torch.float32) - 2.25) * scales.repeat_interleave(128, dim=1)).double()
    ref = x.double() @ w.t()
    for act in ("float", "int8"):
        y = OPS.linear(x, packed, scales, 3, 2.25, 21, 256, act)
        assert y.shape == (2, 5, 21)
        tol = 2e-2 if act == "int8" else 1e-5
        assert float((y.double() - ref).norm() / ref.norm()) < tol


def test_every_isa_agrees_with_scalar():
    codes, scales = _layer(45, 640, 5, 4)
    x = torch.randn(5, 640)
    packed = OPS.pack(codes, 4)
    for act in ("float", "int8"):
        ref = OPS.linear(x, packed, scales, 4, 8.0, 45, 640, act, 0, "scalar")
        for isa in ISAS:
            y = OPS.linear(x, packed, scales, 4, 8.0, 45, 640, act, 0, isa)
            torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("act", ["int8", "float"])
def test_the_default_threshold_picks_the_prefill_path(act):
    bits = 3
    rows = native.default_prefill_rows(act, bits)
    assert rows > 1
    codes, scales = _layer(16, 128, 1, bits)
    packed = OPS.pack(codes, bits)
    for m, path in ((rows - 1, 0), (rows, 1)):  # below: the act kernel (prefill_rows=0); from it on: the GEMM
        x = torch.randn(m, 128)
        y = OPS.linear(x, packed, scales, bits, _zero(bits), 16, 128, act)
        assert torch.equal(y, OPS.linear(x, packed, scales, bits, _zero(bits), 16, 128, act, path))


def test_linear_rejects_bad_arguments():
    codes, scales = _layer(4, 64, 1, 2)
    packed = OPS.pack(codes, 2)
    x = torch.randn(1, 64)
    with pytest.raises(RuntimeError, match="x must be float32"):
        OPS.linear(x.double(), packed, scales, 2, 1.5, 4, 64)
    with pytest.raises(RuntimeError, match="multiples of 32"):
        OPS.linear(x, packed, torch.ones(4, 4), 2, 1.5, 4, 64)
    with pytest.raises(RuntimeError, match="act='int4'"):
        OPS.linear(x, packed, scales, 2, 1.5, 4, 64, "int4")
    with pytest.raises(RuntimeError, match="not an instruction set"):
        OPS.linear(x, packed, scales, 2, 1.5, 4, 64, "int8", -1, "neon")


# ------------------------------------------------------------------------------------------------ dispatch


def test_capabilities_and_isa_selection(monkeypatch):
    caps = native.capabilities()
    assert caps["isas"][0] == "scalar" and caps["best"] == caps["isas"][-1]
    assert set(native.FEATURES) <= set(caps)
    if caps["avx2"] and caps["fma"]:
        assert "avx2" in caps["isas"]
    monkeypatch.delenv("LOWBIT_NATIVE_ISA", raising=False)
    assert caps["selected"] == caps["best"]
    monkeypatch.setenv("LOWBIT_NATIVE_ISA", "scalar")
    assert native.capabilities()["selected"] == "scalar"
    assert OPS.resolve_isa("auto") == 0
    monkeypatch.setenv("LOWBIT_NATIVE_ISA", "sse9")
    with pytest.raises(RuntimeError, match="LOWBIT_NATIVE_ISA=sse9 is not an instruction set"):
        OPS.resolve_isa("auto")
    missing = [isa for isa in native.ISAS if isa not in caps["isas"]]
    for isa in missing:
        with pytest.raises(RuntimeError, match="this CPU runs only"):
            OPS.resolve_isa(isa)


def test_build_key_covers_every_source_file():
    listed = set(native.SOURCES + native.HEADERS)
    assert listed == set(os.listdir(native.CSRC)), "a new csrc file must join SOURCES or HEADERS (the build hash)"
    assert native.unavailable_reason() == ""


def test_a_failed_build_leaves_the_package_importable_with_a_reason(tmp_path):
    code = ("import lowbit_compile.kernels.native as n; import lowbit_compile; "
            "print(n.available()); print(n.unavailable_reason())")
    env = dict(os.environ, LOWBIT_NATIVE_BUILD_DIR=str(tmp_path), CXX="/bin/false")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    available, reason = out.stdout.strip().split("\n", 1)
    assert available == "False" and "could not be built" in reason


# ------------------------------------------------------------------------------------ opcheck and compile


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_opcheck(bits):
    codes, scales = _layer(9, 160, 5, bits)
    packed = OPS.pack(codes, bits)
    torch.library.opcheck(OPS.pack.default, (codes, bits))
    torch.library.opcheck(OPS.unpack.default, (packed, bits, 9, 160))
    for act in ("int8", "float"):
        for x in (torch.randn(3, 160), torch.randn(2, 2, 160)):
            torch.library.opcheck(OPS.linear.default, (x, packed, scales, bits, _zero(bits), 9, 160, act))


def test_torch_compile_inductor_calls_the_op_for_a_fresh_shape():
    codes, scales = _layer(24, 256, 2, 2)
    packed = OPS.pack(codes, 2)

    def f(x):
        return torch.relu(OPS.linear(x * 2, packed, scales, 2, 1.5, 24, 256, "float")) + 1

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="inductor")
    for shape in ((3, 256), (5, 7, 256)):
        x = torch.randn(shape)
        torch.testing.assert_close(compiled(x), f(x))
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------- rotation

# n = K·P: powers of two (K = 1), Paley factors of 12, 36, 44 (float32), 344 and 500 (int8, as
# cpu.rotation_blocks keeps factors above 128), the random orthogonal 23 × 23 of 184 (K not a multiple of the
# kernel's 4 rows), P from 1 (344) and 8 (96, 184: one vector per row) to 4096
ROTATION_SIZES = [8, 64, 96, 184, 192, 344, 576, 1024, 1536, 2816, 4096, 11008, 32000]


def _factor(n):
    from lowbit_compile.kernels import cpu, cpu_native

    return cpu_native.factor_block(list(cpu.rotation_blocks(n)), n)


def _rotation_bound(x, signs, n, transpose):
    """γ_{L+K+3}·c·Σ_b|F[a, b]|·Σ_i|z[b, i]| per output (module docstring), float64 (rows, n)."""
    from lowbit_compile import hadamard

    plan = hadamard.plan(n)
    k, p = plan.factor_size, plan.pow2
    d = (p.bit_length() - 1) + k + 3
    gamma = d * U / (1 - d * U)
    z = x.double() if transpose else (x * signs).double()
    row_sums = z.abs().view(-1, k, p).sum(-1)  # Σ_i |z[b, i]|, (rows, K)
    f = hadamard.factor(n)
    f_abs = torch.ones(1, 1, dtype=torch.float64) if f is None else f.double().abs()
    per_row = row_sums @ (f_abs if transpose else f_abs.t()) / p**0.5  # (rows, K)
    return gamma * per_row.repeat_interleave(p, dim=-1)


def _rotation_reference(x, signs, n, transpose):
    from lowbit_compile import hadamard

    f = hadamard.factor(n)
    return hadamard.apply(x.double(), signs.double(), None if f is None else f.double(), inverse=transpose)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("n", ROTATION_SIZES)
def test_hadamard_matches_the_float64_reference_within_the_derived_bound(n, transpose, isa):
    from lowbit_compile import hadamard

    x = torch.randn(3, n) * torch.rand(1, n) * 3
    signs = hadamard.random_signs(n, n)
    y = OPS.hadamard(x, signs, _factor(n), transpose, isa)
    assert y.shape == x.shape and y.dtype == torch.float32
    err = (y.double() - _rotation_reference(x, signs, n, transpose)).abs()
    bound = _rotation_bound(x, signs, n, transpose)
    assert (err <= bound).all(), float((err / bound).max())


def test_the_rotation_bound_catches_a_small_scale_error_and_a_flipped_factor_sign():
    from lowbit_compile import hadamard

    n = 192  # F_12 ⊗ H_16/4
    x = torch.randn(4, n)
    signs = hadamard.random_signs(n, 1)
    ref, bound = _rotation_reference(x, signs, n, False), _rotation_bound(x, signs, n, False)
    scaled = OPS.hadamard(x, signs, _factor(n), False).double() * (1 + 1e-4)
    assert ((scaled - ref).abs() > bound).float().mean() > 0.5
    f = _factor(n).clone()
    f[3, 5] = -f[3, 5]
    flipped = OPS.hadamard(x, signs, f, False).double()
    assert ((flipped - ref).abs() > bound).any()


def test_an_int8_factor_is_its_float_form_scaled():
    from lowbit_compile import hadamard

    n = 32000  # F_500 as ±1 int8
    x = torch.randn(2, n)
    signs = hadamard.random_signs(n, 3)
    f8 = _factor(n)
    assert f8.dtype == torch.int8
    f32 = hadamard.factor(n)
    for transpose in (False, True):
        a = OPS.hadamard(x, signs, f8, transpose).double()
        b = OPS.hadamard(x, signs, f32, transpose).double()
        assert ((a - b).abs() <= 2 * _rotation_bound(x, signs, n, transpose)).all()


def test_hadamard_is_bit_identical_across_isas_without_a_factor_and_across_thread_counts():
    """H_P is the same additions in the same order everywhere; the factor's rows split over threads (one row of a
    large factor) or the rows of x do not change any output's arithmetic."""
    from lowbit_compile import hadamard

    for n in (8, 1024, 4096, 32000):
        x = torch.randn(3, n)
        signs = hadamard.random_signs(n, 2)
        ref = OPS.hadamard(x, signs, _factor(n), False, "scalar")
        ref_rows = [OPS.hadamard(x[i:i + 1], signs, _factor(n), False) for i in range(3)]
        if _factor(n) is None:
            for isa in ISAS:
                assert torch.equal(OPS.hadamard(x, signs, None, False, isa), ref)
        torch.set_num_threads(2)
        try:
            rows_2 = [OPS.hadamard(x[i:i + 1], signs, _factor(n), False) for i in range(3)]
            both = OPS.hadamard(x, signs, _factor(n), False)
        finally:
            torch.set_num_threads(1)
        assert all(torch.equal(a, b) for a, b in zip(ref_rows, rows_2))
        assert torch.equal(both, torch.cat(ref_rows))


def test_hadamard_round_trip_and_leading_dimensions():
    from lowbit_compile import hadamard

    n = 2816
    x = torch.randn(2, 3, n)
    signs = hadamard.random_signs(n, 4)
    y = OPS.hadamard(x, signs, _factor(n), False)
    assert y.shape == (2, 3, n)
    back = OPS.hadamard(y, signs, _factor(n), True)
    torch.testing.assert_close(back, x, rtol=0, atol=1e-5 * float(x.abs().max()))
    assert OPS.hadamard(torch.randn(0, n), signs, _factor(n)).shape == (0, n)
    assert torch.equal(OPS.hadamard(x[..., ::2].repeat_interleave(2, -1), None, _factor(n)),
                       OPS.hadamard(x[..., ::2].repeat_interleave(2, -1).contiguous(), None, _factor(n)))


def test_hadamard_rejects_bad_arguments():
    x = torch.randn(2, 192)
    f = _factor(192)
    with pytest.raises(RuntimeError, match="x must be a float32"):
        OPS.hadamard(x.double(), None, f)
    with pytest.raises(RuntimeError, match="does not fit n=192"):
        OPS.hadamard(x, None, _factor(576))
    with pytest.raises(RuntimeError, match="square float32"):
        OPS.hadamard(x, None, f[:, :6])
    with pytest.raises(RuntimeError, match=r"signs must be float32 \(n=192\)"):
        OPS.hadamard(x, torch.ones(96), f)


def test_rotated_linear_is_the_three_ops_bit_for_bit():
    from lowbit_compile import hadamard

    n, k, bits = 344, 576, 3
    codes, scales = _layer(n, k, 1, bits)
    packed = native.pack(codes, bits)
    su, sv, bias = hadamard.random_signs(k, 1), hadamard.random_signs(n, 2), torch.randn(n)
    for m in (1, 3, 300):  # decode; int8 rows; the prefill GEMM
        x = torch.randn(m, k)
        h = OPS.hadamard(x, su, _factor(k))
        three = OPS.hadamard(OPS.linear(h, packed, scales, bits, _zero(bits), n, k), sv, _factor(n), True) + bias
        one = OPS.rotated_linear(x, packed, scales, bits, _zero(bits), n, k, su, _factor(k), sv, _factor(n), bias)
        assert torch.equal(one, three)
    x = torch.randn(2, k)
    plain = OPS.rotated_linear(x, packed, scales, bits, _zero(bits), n, k)
    assert torch.equal(plain, OPS.linear(x, packed, scales, bits, _zero(bits), n, k))
    with pytest.raises(RuntimeError, match="factor_in without su"):
        OPS.rotated_linear(x, packed, scales, bits, _zero(bits), n, k, None, _factor(k))


def test_rotated_linear_rotates_the_weight_for_many_rows():
    """From M·(K + N) > 2·N·K rows on (and on the prefill path) the weight is decoded and rotated once instead of
    the activations: the same product up to float32 summation order, with and without each rotation and bias."""
    from lowbit_compile import hadamard

    n, k, bits = 344, 576, 2
    codes, scales = _layer(n, k, 1, bits)
    packed = native.pack(codes, bits)
    su, sv, bias = hadamard.random_signs(k, 1), hadamard.random_signs(n, 2), torch.randn(n)
    w = native.unpack(packed, bits, n, k).to(torch.float32).sub(_zero(bits)).mul(scales)  # Ŵ (one scale per row)
    x = torch.randn(2, 700, k)  # 1400 rows: 1400 · 920 > 2 · 344 · 576
    for s_in, s_out, b in ((su, sv, bias), (su, None, None), (None, sv, bias)):
        h = OPS.hadamard(x, s_in, _factor(k)) if s_in is not None else x
        ref = h @ w.t()
        ref = OPS.hadamard(ref, s_out, _factor(n), True) if s_out is not None else ref
        ref = ref + b if b is not None else ref
        got = OPS.rotated_linear(x, packed, scales, bits, _zero(bits), n, k, s_in,
                                 _factor(k) if s_in is not None else None, s_out,
                                 _factor(n) if s_out is not None else None, b)
        assert got.shape == (2, 700, n)
        assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


def test_rotation_opcheck_and_compile():
    from lowbit_compile import hadamard

    for n in (64, 192, 32000):
        for transpose in (False, True):
            torch.library.opcheck(OPS.hadamard.default,
                                  (torch.randn(2, n), hadamard.random_signs(n, 0), _factor(n), transpose))
    codes, scales = _layer(12, 192, 2, 4)
    packed = native.pack(codes, 4)
    su, sv = hadamard.random_signs(192, 0), hadamard.random_signs(12, 1)
    args = (packed, scales, 4, 8.0, 12, 192, su, _factor(192), sv, _factor(12), torch.randn(12))
    for x in (torch.randn(3, 192), torch.randn(2, 2, 192)):
        torch.library.opcheck(OPS.rotated_linear.default, (x, *args))

    factor = _factor(192)

    def f(x):
        return torch.relu(OPS.hadamard(x * 2, su, factor, False)) + 1

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="inductor")
    for shape in ((3, 192), (5, 7, 192)):
        x = torch.randn(shape)
        torch.testing.assert_close(compiled(x), f(x))
    torch._dynamo.reset()
