"""The CPU fast path (kernels/cpu.py, `lowbit::int4pack_linear`) against the reference op `lowbit::rotated_linear`.

Tolerance. The fast path rounds the rotated activations h to bfloat16 (relative error up to u = 2⁻⁸ per
element, rms about u/√3), the float16 scales to bfloat16 (one error per group of inputs) and the matmul output
z to bfloat16; the prefill path also rounds each decoded weight to bfloat16 when the record has groups (with
one scale per row it multiplies the exact codes and scales the output, which the bound covers). Accumulation is
float32. Treating the roundings as independent, the expected squared error of z_i = Σ_k w_ik h_k is
    u²/3 · (Σ_k (w_ik h_k)² [× 2 on the prefill path] + Σ_g (Σ_{k∈g} w_ik h_k)² + z_i²),
which grows like √K times the typical term. The output rotation is orthonormal, so each row's ℓ2 error carries
over to y unchanged. We allow FACTOR = 2 times the expected ℓ2 error per row: across every case here the
observed error is 0.65–0.96 of the expectation, and a 1 % scale error already overshoots the allowance
(test_the_bound_catches_a_one_percent_scale_error).
"""

import copy
import math

import pytest
import torch
from tinymodels import exported_llama, tiny_llama

import lowbit_compile as lb
from lowbit_compile import formats, hadamard
from lowbit_compile.kernels import cpu, cpu_caps
from lowbit_compile.nn import Int4PackLinear, LowbitLinear, swap_linears
from lowbit_compile.passes import RewriteLinears, count_quantized, layer_meta
from lowbit_compile.passes.base import RUNTIME
from lowbit_compile.quantize.layer import quantize_weight
from lowbit_compile.recipe import parse_spec

pytestmark = pytest.mark.skipif(cpu.packed_block_n() is None, reason="no decodable int4pack layout on this CPU")

U = 2.0**-8  # bfloat16 unit roundoff
FACTOR = 2.0  # allowed error / expected rms error, per row
OP = torch.ops.lowbit.int4pack_linear


def use_dtype(monkeypatch, dtype):
    """Run the prefill path in `dtype` (cpu_caps.prefill_dtype: bfloat16 where it is fast, float32 elsewhere) from
    8 rows on, whatever this CPU is: each capability's path is tested on every machine."""
    monkeypatch.setattr(cpu_caps, "prefill_dtype", lambda: dtype)
    monkeypatch.setattr(cpu, "DEQUANT_MIN_ROWS", 8)


@pytest.fixture(autouse=True)
def _threads_and_seed(one_thread):
    torch.manual_seed(0)
    yield


def _record(recipe, shape, seed=1):
    g = torch.Generator().manual_seed(hash((recipe, shape)) % 2**31)
    return quantize_weight("layer", torch.randn(*shape, generator=g), parse_spec(recipe), seed=seed)


def _ref_args(rec, bias=None):
    t = rec.transform()
    return (rec.qweight, rec.scales, rec.su, rec.sv, t.had_in if t else None, t.had_out if t else None, bias,
            rec.bits, rec.in_features, rec.group_size)


def _row_bound(rec, x, dequantized=False):
    """FACTOR × the expected ℓ2 norm of each row's rounding error (module docstring), from float64 references."""
    h = x.reshape(-1, rec.in_features).double()
    if rec.su is not None:
        f = hadamard.factor(rec.in_features)
        h = hadamard.apply(h, rec.su.double(), None if f is None else f.double())
    w = rec.rotated_weight().double()
    z = h @ w.t()
    walk = (h * h) @ (w * w).t()  # Σ_k (w_ik h_k)²: one independent rounding per term
    gs = rec.group_size or rec.in_features
    groups = torch.einsum("mgk,ngk->mng", h.reshape(len(h), -1, gs), w.reshape(len(w), -1, gs)).pow(2).sum(-1)
    var = U**2 / 3 * ((2 if dequantized else 1) * walk + groups + z * z)
    return FACTOR * var.sum(-1).sqrt() + 1e-6 * z.norm(dim=-1)


def _assert_within_bound(y, y_ref, bound):
    err = (y.double() - y_ref.double()).reshape(len(bound), -1).norm(dim=-1)
    assert bool((err <= bound).all()), f"worst error/bound ratio {float((err / bound).max()):.2f}"
    return float((err / bound).max())


# ----------------------------------------------------------------------------- packing


@pytest.mark.parametrize("recipe", ["w2", "w3", "w4", "w2-g32", "w3-rtn-g64", "w4-rtn-g128"])
@pytest.mark.parametrize("shape", [(344, 256), (96, 384), (40, 64)])
def test_widened_codes_decode_to_the_record_weight_with_bf16_scales_exactly(recipe, shape):
    if parse_spec(recipe).group_size and shape[1] % parse_spec(recipe).group_size:
        pytest.skip("group size does not divide in_features")
    rec = _record(recipe, shape)
    w = cpu.pack_int4(rec)
    n, k = shape
    assert w.packed.shape[0] % cpu.N_ALIGN == 0 and (2 * w.packed.shape[1]) % cpu.K_ALIGN == 0
    decoded = cpu.dequantize_t(w.packed, w.scales_zeros, w.group_size, torch.float32)
    fmt = formats.int_format(rec.bits)
    codes = formats.unpack(rec.qweight, rec.bits, k).to(torch.float64)
    half = 2 if rec.bits < 4 else 1  # 2/3-bit levels are half-integers: codes doubled, scales halved
    s = (rec.scales.double() / half).to(torch.bfloat16).double()
    expected = (half * (codes - fmt.zero)) * s.repeat_interleave(k // s.shape[1], dim=1)
    assert torch.equal(decoded[:k, :n].t().double(), expected)
    assert not decoded[k:].any() and not decoded[:, n:].any()  # padding decodes to zero weights


@pytest.mark.parametrize("n", [1, 2, 12, 40, 96, 192, 344, 1024, 8192, 32000])
def test_kronecker_blocks_equal_the_hadamard_transform_and_its_inverse(n):
    x = torch.randn(3, n, dtype=torch.float64)
    signs = hadamard.random_signs(n, 5).double()
    f = hadamard.factor(n)
    ref = hadamard.apply(x, signs, None if f is None else f.double())
    blocks = [b if b.dtype == torch.int8 else b.double() for b in cpu.rotation_blocks(n)]  # int8: ±1 of a factor
    assert max([1, *[b.shape[0] for b in blocks]]) <= max(cpu.MAX_BLOCK, 1 if f is None else f.shape[0])
    y = cpu.kron_apply(x * signs, blocks)
    assert torch.allclose(y, ref, atol=1e-12)
    assert torch.allclose(cpu.kron_apply(y, blocks, transpose=True) * signs, x, atol=1e-12)
    assert torch.allclose(cpu.kron_apply(y[:1], blocks, transpose=True) * signs, x[:1], atol=1e-12)  # one row


def test_records_the_kernel_cannot_take_say_why():
    assert "int8" in cpu.unsupported_reason(_record("w8", (64, 64)))
    assert "group size 16" in cpu.unsupported_reason(_record("w4-g16", (64, 64)))
    assert cpu.unsupported_reason(_record("w2", (64, 64))) is None


# ----------------------------------------------------------------------------- the op


@pytest.mark.parametrize("recipe", ["w2", "w3", "w4", "w4-rtn", "w2-g32", "w3-rtn-g64"])
@pytest.mark.parametrize("shape", [(344, 192), (96, 344), (64, 256)])
@pytest.mark.parametrize("path", ["int4mm 1 row", "int4mm 7 rows", "dequantized bf16", "dequantized float32"])
def test_op_matches_the_reference_op_to_bf16_precision(recipe, shape, path, monkeypatch):
    if parse_spec(recipe).group_size and shape[1] % parse_spec(recipe).group_size:
        pytest.skip("group size does not divide in_features")
    rec = _record(recipe, shape)
    rows = 1 if path == "int4mm 1 row" else 7 if path == "int4mm 7 rows" else 9
    use_dtype(monkeypatch, torch.float32 if path.endswith("float32") else torch.bfloat16)
    x = torch.randn(rows, shape[1])
    bias = torch.randn(shape[0])
    y = OP(x, *cpu.op_args(cpu.pack_int4(rec), rec.su, rec.sv, bias))
    y_ref = torch.ops.lowbit.rotated_linear(x, *_ref_args(rec, bias))
    assert y.shape == y_ref.shape and y.dtype == torch.float32
    _assert_within_bound(y, y_ref, _row_bound(rec, x, dequantized=path.startswith("dequantized")))


def test_the_bound_catches_a_one_percent_scale_error():
    rec = _record("w4", (344, 192))
    x = torch.randn(16, 192)
    good = OP(x, *cpu.op_args(cpu.pack_int4(rec), rec.su, rec.sv, None))
    y_ref = torch.ops.lowbit.rotated_linear(x, *_ref_args(rec))
    bound = _row_bound(rec, x)
    _assert_within_bound(good, y_ref, bound)
    bad = OP(x, *cpu.op_args(cpu.pack_int4(rec), rec.su, rec.sv, None)) * 1.01  # a 1 % scale error
    err = (bad - y_ref).norm(dim=-1).double()
    assert bool((err > bound).all())


def test_input_shape_and_dtype_are_kept():
    rec = _record("w3", (96, 192))
    args = cpu.op_args(cpu.pack_int4(rec), rec.su, rec.sv, None)
    x = torch.randn(2, 3, 192, dtype=torch.bfloat16)
    y = OP(x, *args)
    assert y.shape == (2, 3, 96) and y.dtype == torch.bfloat16
    assert OP(torch.randn(0, 192), *args).shape == (0, 96)


def test_opcheck():
    rec = _record("w2", (96, 192))
    plain = _record("w4-rtn-g64", (96, 192))
    for r, bias, x in ((rec, torch.randn(96), torch.randn(2, 3, 192)),
                       (rec, None, torch.randn(1, 192, requires_grad=True)),
                       (plain, torch.randn(96), torch.randn(4, 192, requires_grad=True))):
        torch.library.opcheck(OP.default, (x, *cpu.op_args(cpu.pack_int4(r), r.su, r.sv, bias)))


def test_input_gradients_match_the_reference_op():
    rec = _record("w3", (96, 344))
    bias = torch.randn(96)
    x = torch.randn(4, 344, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    g = torch.randn(4, 96)
    OP(x, *cpu.op_args(cpu.pack_int4(rec), rec.su, rec.sv, bias)).backward(g)
    torch.ops.lowbit.rotated_linear(x_ref, *_ref_args(rec, bias)).backward(g)
    # the backward decodes the weights exactly (float32); only the bfloat16 scales differ: ≤ u relative per row
    assert (x.grad - x_ref.grad).norm() <= U * x_ref.grad.norm()


# ----------------------------------------------------------------------------- modules, pass, backend


def _model_tolerance(y, y_ref, y_float):
    """Relative error of the fast model against the reference model: a few u per linear on the path, and far
    below what quantization itself changes (asserted too, so the comparison is not vacuous)."""
    rel = float((y - y_ref).norm() / y_ref.norm())
    quant = float((y_ref - y_float).norm() / y_ref.norm())
    assert rel <= 4 * U and rel <= 0.1 * quant, (rel, quant)


@pytest.fixture
def int4pack_chosen(monkeypatch):
    """kernels/cpu_caps.py picks int4pack on CPUs with fast bfloat16; force it here so these tests run anywhere."""
    monkeypatch.setenv(cpu_caps.KERNEL_ENV, "int4pack")


def test_swap_linears_fast_uses_the_cpu_modules_and_keeps_reference_by_default(int4pack_chosen):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(192, 344), torch.nn.GELU(), torch.nn.Linear(344, 96)).eval()
    recs = {"0": quantize_weight("0", model[0].weight, parse_spec("w2")),
            "2": quantize_weight("2", model[2].weight, parse_spec("w4-g8"))}  # group 8: no int4pack form
    ref, fast = swap_linears(model, recs), swap_linears(model, recs, fast=True)
    assert isinstance(ref[0], LowbitLinear) and isinstance(ref[2], LowbitLinear)
    assert isinstance(fast[0], Int4PackLinear) and isinstance(fast[2], LowbitLinear)
    assert fast[0].runtime.startswith("int4pack") and "int2 widened" in fast[0].runtime
    assert "rot_" not in "".join(fast.state_dict()) and "0.packed" in fast.state_dict()  # blocks: constants
    x = torch.randn(5, 192)
    with torch.no_grad():
        _model_tolerance(fast(x), ref(x), model(x))
    with pytest.raises(lb.LowbitError, match="either make_module or fast"):
        swap_linears(model, recs, fast=True, make_module=lambda r, b: None)


def test_rewrite_auto_puts_int4pack_ops_in_a_real_llama_export_graph(int4pack_chosen):
    model, ids, gm, names = exported_llama(layers=1)
    recs = {n: quantize_weight(n, model.get_submodule(n).weight, parse_spec("w3"), seed=0) for n in names}
    ref_gm = copy.deepcopy(gm)
    rewrite = RewriteLinears(recs, kernels="auto")
    rewrite(gm)
    RewriteLinears(recs)(ref_gm)  # the default: reference ops
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(OP.default) == 7 == count_quantized(gm)
    assert torch.ops.lowbit.rotated_linear.default not in targets
    assert not any(name.endswith("_qweight") for name, _ in gm.named_buffers())  # only the packed form is held
    assert all(layer_meta(gm)[n][RUNTIME].startswith("int4pack") for n in names)
    with torch.no_grad():
        _model_tolerance(gm(ids).logits, ref_gm(ids).logits, model(ids).logits)
    with pytest.raises(lb.LowbitError, match="kernels='fast'"):
        RewriteLinears(recs, kernels="fast")


def test_backend_uses_the_int4pack_path_through_inductor_where_chosen(int4pack_chosen, monkeypatch):
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setattr(cpu_caps, "prefill_dtype", lambda: torch.bfloat16)  # 10 rows: the int4 kernel, anywhere

    torch._dynamo.reset()
    lb.reset()
    model = tiny_llama(layers=1)
    ids = torch.randint(0, 320, (2, 5))
    try:
        with torch.no_grad():
            fast = torch.compile(model, backend="lowbit", options={"recipe": "w2"})
            y, code = run_and_get_code(lambda: fast(ids).logits)
            report = lb.last_report()
            ref = torch.compile(model, backend="lowbit", options={"recipe": "w2", "kernels": "reference",
                                                                  "compiler": "eager"})
            torch._dynamo.reset()
            y_ref = ref(ids).logits
            y_float = model(ids).logits
    finally:
        torch._dynamo.reset()
        lb.reset()
    assert {r.runtime.split()[0] for r in report.quantized} == {"int4pack"} and report.rewritten == 7
    assert "int2 widened" in report.table()
    code = "\n".join(code)
    assert "_weight_int4pack_mm_for_cpu" in code and "torch.ops.lowbit" not in code  # Inductor saw inside the op
    _model_tolerance(y, y_ref, y_float)


def test_backend_rejects_an_unknown_kernels_option():
    with pytest.raises(Exception, match=r"option kernels='fast': valid values are \('auto', 'reference'\)"):
        with torch.no_grad():
            torch.compile(torch.nn.Linear(8, 8), backend="lowbit", options={"kernels": "fast"})(torch.randn(2, 8))


def test_in_memory_width_is_reported():
    w = cpu.pack_int4(_record("w2", (4096 // 8, 4096 // 8)))
    assert math.isclose(w.bits_per_weight(), 4 + 2 * 16 / 256)  # 4-bit codes + bf16 scale and zero per 256
    assert w.describe() == "int4pack 4.12 b/w in memory, int2 widened"
