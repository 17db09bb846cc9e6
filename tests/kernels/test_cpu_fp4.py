"""The FP4 CPU fast path (kernels/cpu_fp4.py, `lowbit::fp4pack_linear`) against the reference `lowbit::fp4_linear`.

Tolerance, as for the integer fast path (tests/kernels/test_cpu_fast.py). The weight reaches the kernel exactly
(small integer digits; row scales applied in float32 afterwards), so the roundings are: W4A16 activations h to
bfloat16 (relative u = 2⁻⁸ at most, rms u/√3), none for W4A4 activations (bias-0 FP4 values are exact in
bfloat16), and the kernel's bfloat16 output of each digit part z_p (one rounding each; the prefill path rounds the
one GEMM output z). With independent roundings the expected squared error of a row's output is
    s_n² · u²/3 · ([W4A16] Σ_k (v_nk h_k)² + Σ_p z_p²)
for the bias-0 weight values v and row scale s_n. We allow FACTOR = 2 times its square root per row; a 1 % error
in the row scales overshoots it (test_the_bound_catches_a_one_percent_row_scale_error), and the backend tests below
compare whole models with the reference kernels.
"""

import pytest
import torch
from tinymodels import tiny_llama

import lowbit_compile as lb
from lowbit_compile import hadamard
from lowbit_compile.formats import fp4 as f4
from lowbit_compile.kernels import cpu, cpu_caps, cpu_fp4
from lowbit_compile.kernels.fp4_ops import dequantize_fp4_weight, quantize_fp4_activations
from lowbit_compile.nn import FP4PackLinear, LowbitFP4Linear, swap_linears
from lowbit_compile.quantize import fp4 as q

pytestmark = pytest.mark.skipif(cpu.packed_block_n() is None, reason="no decodable int4pack layout on this CPU")

U = 2.0**-8
FACTOR = 2.0
OP = torch.ops.lowbit.fp4pack_linear
REF = torch.ops.lowbit.fp4_linear
FORMATS = ("e2m1", "e1m2", "e3m0")


@pytest.fixture(autouse=True)
def _threads_and_seed(one_thread):
    torch.manual_seed(0)
    yield


def _weights(fmt, n, k, seed=0):
    """Random FP4 codes and float16 row scales, as a record stores them."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scales = (0.01 + torch.rand(n, 1, generator=g)).to(torch.float16)
    return f4.pack_codes(codes), scales


def _parts(w: cpu_fp4.FP4Pack) -> list[torch.Tensor]:
    """Each digit part's weight as the kernel sees it (digit × its scale), float32 (n, k)."""
    n_pad = w.packed.shape[0] // w.parts
    d = cpu.dequantize_t(w.packed, w.scales_zeros, w.group_size, torch.float32)
    return [d[:w.in_features, p * n_pad:p * n_pad + w.out_features].t() for p in range(w.parts)]


def _row_bound(w, h, a16: bool):
    """FACTOR × the expected ℓ2 error per row (module docstring); h the activations the reference multiplies."""
    h = h.reshape(-1, w.in_features).double()
    parts = [p.double() for p in _parts(w)]
    v = sum(parts)
    var = sum(((h @ p.t()) ** 2) for p in parts)
    if a16:
        var = var + (h * h) @ (v * v).t()
    s = w.row_scale.double()
    return FACTOR * (U**2 / 3 * var * s * s).sum(-1).sqrt() + 1e-6 * (h @ (v * s[:, None]).t()).norm(dim=-1)


def _assert_within_bound(y, y_ref, bound):
    err = (y.double() - y_ref.double()).reshape(len(bound), -1).norm(dim=-1)
    assert bool((err <= bound).all()), f"worst error/bound ratio {float((err / bound).max()):.2f}"
    return float((err / bound).max())


# ----------------------------------------------------------------------------- packing


@pytest.mark.parametrize("fmt", FORMATS)
def test_int4_digits_rebuild_every_fp4_value_exactly(fmt):
    c, base, parts, digits = cpu_fp4.split_table(fmt)
    assert int(digits.abs().max()) <= 7  # q = 8 + digit stays inside [1, 15]
    value = digits[:, 0] * base + digits[:, 1] if parts == 2 else digits[:, 0]
    assert torch.equal(value.double() * c, f4.fp4_format(fmt).grid(0.0).double())
    assert parts == (1 if fmt == "e1m2" else 2)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(100, 200), (64, 64), (130, 33)])
def test_packed_digits_decode_to_the_reference_weight_exactly(fmt, shape):
    n, k = shape
    qw, ws = _weights(fmt, n, k)
    w = cpu_fp4.pack_fp4(qw, ws, fmt, k)
    assert w.packed.shape[0] == w.parts * cpu._round_up(n, cpu.N_ALIGN)
    decoded = sum(_parts(w)) * w.row_scale[:, None]
    assert torch.equal(decoded, dequantize_fp4_weight(qw, ws, fmt, k))
    full = cpu.dequantize_t(w.packed, w.scales_zeros, w.group_size, torch.float32)
    n_pad = w.packed.shape[0] // w.parts
    for p in range(w.parts):  # the padding decodes to zero weights
        block = full[:, p * n_pad:(p + 1) * n_pad]
        assert not block[k:].any() and not block[:, n:].any()


# ----------------------------------------------------------------------------- the op


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("a_format", [None, "e2m1", "e1m2"])
@pytest.mark.parametrize("path", ["int4mm 1 row", "int4mm 7 rows", "dequantized bf16", "dequantized float32"])
def test_op_matches_the_reference_op_to_bf16_precision(fmt, a_format, path, monkeypatch):
    n, k = 96, 200
    qw, ws = _weights(fmt, n, k, seed=FORMATS.index(fmt))
    rows = 1 if path == "int4mm 1 row" else 7 if path == "int4mm 7 rows" else 9
    dtype = torch.float32 if path.endswith("float32") else torch.bfloat16
    monkeypatch.setattr(cpu_caps, "prefill_dtype", lambda: dtype)
    monkeypatch.setattr(cpu, "DEQUANT_MIN_ROWS", 8)
    x = torch.randn(rows, k) * 3
    shift = torch.randint(0, 3, (k,), dtype=torch.uint8)
    act_scale = None if a_format is None else f4.max_scaled_scale(x.abs().max() * 4, f4.fp4_format(a_format))
    act_scale = None if act_scale is None else act_scale.reshape(1)
    bias = torch.randn(n)
    w = cpu_fp4.pack_fp4(qw, ws, fmt, k)
    y = OP(x, *cpu_fp4.op_args(w, None, shift, act_scale, a_format, bias))
    y_ref = REF(x, qw, ws, shift, act_scale, fmt, a_format, bias, k)
    assert y.shape == y_ref.shape and y.dtype == torch.float32
    h = quantize_fp4_activations(x, shift, act_scale, a_format)
    _assert_within_bound(y, y_ref, _row_bound(w, h, a16=a_format is None))


def test_three_dimensional_input_keeps_its_shape_and_dtype():
    qw, ws = _weights("e2m1", 64, 96)
    w = cpu_fp4.pack_fp4(qw, ws, "e2m1", 96)
    x = torch.randn(2, 5, 96, dtype=torch.bfloat16)
    y = OP(x, *cpu_fp4.op_args(w, None, None, None, None, None))
    assert y.shape == (2, 5, 64) and y.dtype == torch.bfloat16


def test_the_bound_catches_a_one_percent_row_scale_error():
    qw, ws = _weights("e2m1", 96, 200)
    x = torch.randn(16, 200)
    w = cpu_fp4.pack_fp4(qw, ws, "e2m1", 200)
    bound = _row_bound(w, x, a16=True)
    y_ref = REF(x, qw, ws, None, None, "e2m1", None, None, 200)
    _assert_within_bound(OP(x, *cpu_fp4.op_args(w, None, None, None, None, None)), y_ref, bound)
    w.row_scale = w.row_scale * 1.01
    with pytest.raises(AssertionError, match="worst error/bound"):
        _assert_within_bound(OP(x, *cpu_fp4.op_args(w, None, None, None, None, None)), y_ref, bound)


@pytest.mark.parametrize("k", [96, 256])
def test_fp4_rot_rotation_inside_the_op_equals_the_hadamard_op(k):
    qw, ws = _weights("e1m2", 64, k)
    w = cpu_fp4.pack_fp4(qw, ws, "e1m2", k)
    su = hadamard.random_signs(k, 3)
    x = torch.randn(4, k)
    rotated = torch.ops.lowbit.hadamard(x, su, hadamard.factor(k))
    y = OP(x, *cpu_fp4.op_args(w, su, None, None, None, None))
    _assert_within_bound(y, REF(rotated, qw, ws, None, None, "e1m2", None, None, k), _row_bound(w, rotated, True))
    # W4A4: the op rounds exactly what it rotated (the rotation is wired before shift and rounding)
    scale = torch.tensor([0.25], dtype=torch.float16)
    shift = torch.randint(0, 2, (k,), dtype=torch.uint8)
    own = cpu.kron_apply(x * su, list(cpu.rotation_blocks(k)))
    assert torch.equal(OP(x, *cpu_fp4.op_args(w, su, shift, scale, "e2m1", None)),
                       OP(own, *cpu_fp4.op_args(w, None, shift, scale, "e2m1", None)))


def test_opcheck():
    qw, ws = _weights("e3m0", 64, 96)
    w = cpu_fp4.pack_fp4(qw, ws, "e3m0", 96)
    su = hadamard.random_signs(96, 1)
    scale = torch.tensor([0.5], dtype=torch.float16)
    shift = torch.randint(0, 2, (96,), dtype=torch.uint8)
    for args in ((None, None, None, None, None), (su, shift, scale, "e2m1", torch.randn(64))):
        torch.library.opcheck(OP.default, (torch.randn(3, 96), *cpu_fp4.op_args(w, *args)),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_w4a4_without_activation_scale_is_a_clear_error():
    qw, ws = _weights("e2m1", 64, 64)
    w = cpu_fp4.pack_fp4(qw, ws, "e2m1", 64)
    with pytest.raises(lb.LowbitError, match="needs act_scale"):
        OP(torch.randn(1, 64), *cpu_fp4.op_args(w, None, None, None, "e2m1", None))


# ----------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def fp4_llamas():
    """A one-layer tiny Llama quantized with fp4 (W4A4, exponents folded into the norms), fp4-rot and w4a16-fp4."""
    grid, rounds = q.CLIP_GRID, q.SEARCH_ROUNDS
    q.CLIP_GRID, q.SEARCH_ROUNDS = (0.6, 0.8, 1.0), 1
    try:
        torch.manual_seed(0)
        model = tiny_llama(layers=1)
        g = torch.Generator().manual_seed(0)
        batches = [torch.randint(0, 320, (2, 16), generator=g) for _ in range(2)]
        return model, {r: lb.quantize(model, r, batches, progress=False) for r in ("fp4", "fp4-rot", "w4a16-fp4")}
    finally:
        q.CLIP_GRID, q.SEARCH_ROUNDS = grid, rounds


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("recipe", ["fp4", "fp4-rot", "w4a16-fp4"])
def test_backend_runs_fp4_layers_on_the_fast_path_close_to_the_reference(fp4_llamas, recipe, fresh_compiler):
    model, cks = fp4_llamas
    ck = cks[recipe]
    ids = torch.randint(0, 320, (2, 9))
    with torch.no_grad():
        ref = torch.compile(model, backend="lowbit", options={"checkpoint": ck, "compiler": "eager",
                                                               "kernels": "reference"})(ids).logits
        torch._dynamo.reset()
        fast = torch.compile(model, backend="lowbit", options={"checkpoint": ck, "compiler": "eager"})(ids).logits
        float_out = model(ids).logits
    report = lb.last_report()
    assert report.rewritten == 7
    assert all(r.runtime.startswith("fp4pack") for r in report.quantized), [r.runtime for r in report.quantized]
    assert "fp4pack" in report.table()
    quant_err = _rel(ref, float_out)
    if recipe == "w4a16-fp4":  # bfloat16 activations: a few ops' worth of the per-op error (~2⁻⁹ relative)
        assert _rel(fast, ref) < 1e-2
    else:
        # W4A4: a bfloat16 difference upstream moves an activation lying near an FP4 midpoint to the neighbouring
        # grid value, an error of the same kind the activation quantizer makes anyway. So the fast model must be
        # as close to float as the reference model, and much closer to the reference than either is to float.
        assert _rel(fast, ref) < 0.25 * quant_err
        assert _rel(fast, float_out) < 1.1 * quant_err


def test_fp4_fast_path_through_inductor_and_a_second_shape(fp4_llamas, fresh_compiler):
    model, cks = fp4_llamas
    compiled = torch.compile(model, backend="lowbit", options={"checkpoint": cks["w4a16-fp4"]})
    with torch.no_grad():
        for shape in ((2, 9), (1, 4)):
            ids = torch.randint(0, 320, shape)
            ref = lb.swap_linears(model, cks["w4a16-fp4"].records)(ids).logits
            assert _rel(compiled(ids).logits, ref) < 1e-2


def test_swap_linears_fast_uses_fp4pack_modules(fp4_llamas):
    model, cks = fp4_llamas
    ids = torch.randint(0, 320, (2, 9))
    for recipe in ("fp4-rot", "w4a16-fp4"):
        fast = swap_linears(model, cks[recipe].records, fast=True)
        ref = swap_linears(model, cks[recipe].records)
        mods = [m for m in fast.modules() if isinstance(m, (FP4PackLinear, LowbitFP4Linear))]
        assert len(mods) == 7 and all(isinstance(m, FP4PackLinear) for m in mods)
        assert "fp4pack" in repr(mods[0])
        with torch.no_grad():
            rel = _rel(fast(ids).logits, ref(ids).logits)
        assert rel < (1e-2 if recipe == "w4a16-fp4" else 0.1)
