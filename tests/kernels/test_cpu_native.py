"""`lowbit::native_linear` (kernels/cpu_native.py: rotations + the native kernels) against the reference
`lowbit::rotated_linear`, its module and pass forms, and the backend through Inductor.

Tolerances.
- Prefill (rows ≥ the kernel's threshold): weights decoded exactly to float32, float32 GEMM and native rotations
  (tests/kernels/test_native.py bounds them): float rounding only, measured ~1e-6 relative; 1e-5·‖y‖ per row.
- Decode (few rows): the rotated activations h are rounded to int8 per block of 32 (step d = max|h_block|/127).
  With e_k = ĥ_k − h_k uniform in ±d_k/2 and independent, the pre-rotation output error of row m has expected
  squared norm Σ_n Σ_k Ŵ'²_nk d²_mk / 12; the output rotation is orthogonal, so the same holds after it. Allowed:
  1.5 × its square root (over ≥ 300 outputs the norm's relative spread is < 10 %), plus float rounding. A 1 %
  scale error adds ~1 % of ‖y‖, about twice the int8 error, and fails it (tested).
"""

import pytest
import torch
from tinymodels import exported_llama, tiny_llama

import lowbit_compile as lb
from lowbit_compile.kernels import cpu, cpu_caps, cpu_native, native
from lowbit_compile.nn import NativeLinear, swap_linears
from lowbit_compile.passes import RewriteLinears, count_quantized, layer_meta
from lowbit_compile.passes.base import KERNEL_REASON, RUNTIME
from lowbit_compile.quantize.layer import quantize_weight
from lowbit_compile.recipe import parse_spec

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.unavailable_reason()}")

OP = torch.ops.lowbit.native_linear
FACTOR = 1.5


@pytest.fixture(autouse=True)
def _threads_and_seed(one_thread):
    torch.manual_seed(0)
    yield


@pytest.fixture
def native_chosen(monkeypatch):
    monkeypatch.setenv(cpu_caps.KERNEL_ENV, "native")


def _record(recipe, shape, seed=1):
    g = torch.Generator().manual_seed(hash((recipe, shape)) % 2**31)
    return quantize_weight("layer", torch.randn(*shape, generator=g), parse_spec(recipe), seed=seed)


def _ref(rec, x, bias=None):
    t = rec.transform()
    return torch.ops.lowbit.rotated_linear(x, rec.qweight, rec.scales, rec.su, rec.sv, t.had_in if t else None,
                                           t.had_out if t else None, bias, rec.bits, rec.in_features, rec.group_size)


def _args(rec, bias=None):
    return cpu_native.op_args(cpu_native.pack_native(rec), rec.su, rec.sv, bias)


def _int8_bound(rec, x):
    """FACTOR × the expected ℓ2 error of each row from int8-rounding the rotated activations (module docstring)."""
    h = x.reshape(-1, rec.in_features).to(torch.float32)
    if rec.su is not None:
        factor = cpu_native.factor_block(list(cpu.rotation_blocks(rec.in_features)), rec.in_features)
        h = native.hadamard(h, rec.su, factor)  # the op's own h, bit for bit
    m, k = h.shape
    kp = -(-k // 32) * 32
    d = torch.nn.functional.pad(h, (0, kp - k)).view(m, -1, 32).abs().amax(-1, keepdim=True) / 127
    d = d.expand(m, kp // 32, 32).reshape(m, kp)[:, :k].double()
    w = rec.rotated_weight().double()
    var = (d * d) @ (w * w).t() / 12
    return FACTOR * var.sum(-1).sqrt()


@pytest.mark.parametrize("recipe", ["w2", "w3", "w4", "w4-rtn", "w2-g32", "w3-rtn-g64"])
@pytest.mark.parametrize("shape", [(344, 192), (96, 344), (320, 256)])
def test_decode_matches_the_reference_within_the_int8_activation_bound(recipe, shape):
    if parse_spec(recipe).group_size and shape[1] % parse_spec(recipe).group_size:
        pytest.skip("group size does not divide in_features")
    rec = _record(recipe, shape)
    x = torch.randn(4, shape[1])
    bias = torch.randn(shape[0])
    y = OP(x, *_args(rec, bias))
    y_ref = _ref(rec, x, bias)
    assert y.shape == y_ref.shape and y.dtype == torch.float32
    err = (y - y_ref).double().norm(dim=-1)
    bound = _int8_bound(rec, x) + 1e-5 * y_ref.double().norm(dim=-1)
    assert bool((err <= bound).all()), float((err / bound).max())
    assert bool((err > 0).any())  # the int8 path really ran (a float path would be ~1e-7)


def test_the_int8_bound_catches_a_one_percent_scale_error():
    rec = _record("w4", (344, 192))
    x = torch.randn(4, 192)
    y_ref = _ref(rec, x)
    bad = OP(x, *_args(rec)) * 1.01
    err = (bad - y_ref).double().norm(dim=-1)
    assert bool((err > _int8_bound(rec, x) + 1e-5 * y_ref.double().norm(dim=-1)).all())


@pytest.mark.parametrize("recipe", ["w2", "w3", "w4-g64"])
def test_prefill_matches_the_reference_to_float_rounding(recipe):
    rec = _record(recipe, (344, 192))
    rows = native.default_prefill_rows("int8", rec.bits)
    x = torch.randn(rows + 3, 192)
    y, y_ref = OP(x, *_args(rec)), _ref(rec, x)
    assert bool(((y - y_ref).norm(dim=-1) <= 1e-5 * y_ref.norm(dim=-1)).all())


def test_input_shape_and_dtype_are_kept():
    rec = _record("w3", (96, 192))
    x = torch.randn(2, 3, 192, dtype=torch.bfloat16)
    y = OP(x, *_args(rec))
    assert y.shape == (2, 3, 96) and y.dtype == torch.bfloat16
    assert OP(torch.randn(0, 192), *_args(rec)).shape == (0, 96)


def test_opcheck():
    for r, bias, x in ((_record("w2", (96, 192)), torch.randn(96), torch.randn(2, 3, 192)),
                       (_record("w4-rtn-g64", (96, 192)), None, torch.randn(4, 192, requires_grad=True))):
        torch.library.opcheck(OP.default, (x, *_args(r, bias)))


def test_input_gradients_match_the_reference_op():
    rec = _record("w3", (96, 344))
    bias = torch.randn(96)
    x = torch.randn(4, 344, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    g = torch.randn(4, 96)
    OP(x, *_args(rec, bias)).backward(g)
    _ref(rec, x_ref, bias).backward(g)
    assert (x.grad - x_ref.grad).norm() <= 1e-5 * x_ref.grad.norm()  # the backward decodes exactly (float32)


def test_in_memory_width_is_the_records_own():
    w = cpu_native.pack_native(_record("w2", (512, 512)))
    assert w.bits_per_weight() == pytest.approx(2 + 32 / 512)  # codes + one float32 scale per row
    assert w.describe().startswith("native int2 (") and "2.06 b/w in memory" in w.describe()


def test_swap_linears_fast_uses_native_modules_where_chosen(native_chosen):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(192, 344), torch.nn.GELU(), torch.nn.Linear(344, 96)).eval()
    recs = {"0": quantize_weight("0", model[0].weight, parse_spec("w2")),
            "2": quantize_weight("2", model[2].weight, parse_spec("w4-g8"))}  # group 8: no CPU kernel
    ref, fast = swap_linears(model, recs), swap_linears(model, recs, fast=True)
    assert isinstance(fast[0], NativeLinear) and not isinstance(fast[2], NativeLinear)
    assert "rot_" not in "".join(fast.state_dict()) and "0.packed" in fast.state_dict()
    x = torch.randn(5, 192)
    with torch.no_grad():
        y, y_ref, y_float = fast(x), ref(x), model(x)
    assert (y - y_ref).norm() <= 0.1 * (y_ref - y_float).norm()  # int8 activations: far below quantization


def test_rewrite_puts_native_ops_in_a_real_llama_export_graph(native_chosen):
    model, ids, gm, names = exported_llama(layers=1)
    recs = {n: quantize_weight(n, model.get_submodule(n).weight, parse_spec("w2"), seed=0) for n in names}
    rewrite = RewriteLinears(recs, kernels="auto")
    rewrite(gm)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(OP.default) == 7 == count_quantized(gm)
    done = layer_meta(gm)
    assert all(done[n][RUNTIME].startswith("native int2") for n in names)
    assert {done[n][KERNEL_REASON] for n in names} == {f"{cpu_caps.KERNEL_ENV}=native"}


def test_backend_runs_native_kernels_through_inductor(native_chosen):
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    lb.reset()
    model = tiny_llama(layers=1)
    ids = torch.randint(0, 320, (1, 5))
    try:
        # Inductor's caches are keyed by the graph before the op is decomposed: a graph compiled by an older
        # native_linear body would come back from them
        with torch.no_grad(), torch.compiler.config.patch(force_disable_caches=True):
            fast = torch.compile(model, backend="lowbit", options={"recipe": "w2"})
            y, code = run_and_get_code(lambda: fast(ids).logits)
            report = lb.last_report()
            torch._dynamo.reset()
            ref = torch.compile(model, backend="lowbit", options={"recipe": "w2", "kernels": "reference",
                                                                  "compiler": "eager"})
            y_ref, y_float = ref(ids).logits, model(ids).logits
    finally:
        torch._dynamo.reset()
        lb.reset()
    assert {r.runtime.split()[0] for r in report.quantized} == {"native"} and report.rewritten == 7
    assert any("CPU kernel of 7 integer layer(s)" in n for n in report.notes)
    code = "\n".join(code)
    assert code.count("lowbit_native.rotated_linear.default(") == 7  # one native call per layer
    assert "torch.ops.lowbit." not in code  # Inductor saw inside the op
    assert (y - y_ref).norm() <= 0.1 * (y_ref - y_float).norm()
