"""`lowbit::e8p_linear` (kernels/e8_ops.py) against the record's dense dequantized weight, opcheck and gradients; and
the E8 records on the native 4-bit kernel (their codes as digits, kernels/cpu_native.py) against the reference op.

Tolerances. The reference computes the rotations in float32 (about log2(n) roundings per element): 2e-5 absolute on
O(1) outputs against float64 math with the dense weight, as tests/kernels/test_rotated_linear.py. The native path
decodes digits exactly (e8p.int4_digits: exact dyadic values times the float16 scale split into exact powers of two),
so its prefill (float32 GEMM) is float rounding only, 1e-5·‖y‖ per row; its decode rounds the rotated activations
to int8 per block of 32, and both stages of the 3/4-bit formats see the same rounded activations, so the error is
Ŵ'(ĥ − h) for the summed weight: the bound of tests/kernels/test_cpu_native.py.
"""

import pytest
import torch

from lowbit_compile import hadamard
from lowbit_compile.kernels import cpu, cpu_caps, cpu_native, native
from lowbit_compile.kernels.specs import E8P_LINEAR, unshared
from lowbit_compile.nn import LowbitLinear, NativeLinear, swap_linears
from lowbit_compile.quantize.e8 import quantize_e8_linear
from lowbit_compile.quantize.records import E8QuantizedLinear

pytestmark = pytest.mark.usefixtures("one_thread")
OP = torch.ops.lowbit.e8p_linear
F64 = torch.float64


def _record(bits, shape, seed=0, tuned=False) -> E8QuantizedLinear:
    g = torch.Generator().manual_seed(seed + 10 * bits)
    w = torch.randn(*shape, generator=g)
    x = torch.randn(2 * shape[1], shape[1], generator=g) @ (torch.eye(shape[1]) + 0.3 * torch.randn(
        shape[1], shape[1], generator=g) / shape[1] ** 0.5)
    rec = quantize_e8_linear(w, (x.T.double() @ x.double()) / x.shape[0], bits, seed=seed, fqn="layer")
    if tuned:  # sign vectors made real by fine-tuning (float16 values)
        rec.su = (rec.su * (1 + 0.2 * torch.rand(shape[1], generator=g))).half().float()
        rec.sv = (rec.sv * (1 + 0.2 * torch.rand(shape[0], generator=g))).half().float()
    return rec


def _call(rec, x, bias=None):
    return E8P_LINEAR(x=x, bias=bias, **{k: unshared(v) for k, v in rec.op_arguments().items()})


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("shape", [(96, 192), (344, 96)])
def test_op_equals_the_dense_dequantized_weight(bits, shape):
    rec = _record(bits, shape, tuned=shape[0] == 344)
    g = torch.Generator().manual_seed(bits)
    x, b = torch.randn(3, 5, shape[1], generator=g), torch.randn(shape[0], generator=g)
    y = _call(rec, x, b)
    ref = torch.nn.functional.linear(x.double(), rec.dequantized_weight().double(), b.double())
    assert y.shape == (3, 5, shape[0]) and y.dtype == torch.float32
    # float32 rotations and GEMM against float64: a few float32 ulps of the largest output
    assert torch.allclose(y.double(), ref, atol=1e-5 * float(ref.abs().max()), rtol=1e-5)


def test_record_weight_is_the_decoded_codes_times_scales_in_the_rotated_basis():
    rec = _record(3, (96, 192))
    codes = rec.codes()
    assert codes.shape == (96, 24, 2) and rec.qweight.shape == (96, 72)
    w_rot = rec.e8_format.dequantize(codes).reshape(96, 192).double() * rec.scales.double()
    assert torch.equal(rec.rotated_weight().double(), w_rot)
    u = hadamard.dense(96) @ torch.diag(rec.sv.double())
    v = hadamard.dense(192) @ torch.diag(rec.su.double())
    assert torch.allclose(rec.dequantized_weight().double(), u.T @ w_rot @ v, atol=1e-6)


def test_opcheck_and_input_gradients():
    torch.manual_seed(0)  # the inputs below: not whatever the tests before left in the global generator
    rec = _record(2, (48, 96))
    for bias in (None, torch.randn(48)):
        for x in (torch.randn(2, 3, 96), torch.randn(4, 96, requires_grad=True)):
            a = {k: unshared(v) for k, v in rec.op_arguments().items()}
            torch.library.opcheck(OP.default, (x, a["qweight"], a["scales"], a["su"], a["sv"], a["had_in"],
                                               a["had_out"], bias, rec.bits, rec.in_features))
    x = torch.randn(4, 96, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    b = torch.randn(48, requires_grad=True)
    _call(rec, x, b).pow(2).sum().backward()
    torch.nn.functional.linear(x2, rec.dequantized_weight(), b.detach()).pow(2).sum().backward()
    # the op's backward rotates the gradient (butterflies) where the reference multiplies by the dense weight: float32
    # rounding in another order, so the error is relative to the gradient's scale (entries up to a few hundred here;
    # at most 7e-7 of the largest over 40 seeds), as the exporters compare outputs; a wrong code or sign is O(1)
    assert (x.grad - x2.grad).abs().max() <= 1e-4 + 1e-5 * x2.grad.abs().max()
    assert b.grad is not None


def test_swap_linears_builds_a_reference_module_for_e8_records():
    model = torch.nn.Sequential(torch.nn.Linear(96, 48)).eval()
    rec = _record(2, (48, 96))
    swapped = swap_linears(model, {"0": rec})
    assert isinstance(swapped[0], LowbitLinear) and swapped[0].op is E8P_LINEAR
    x = torch.randn(3, 96)
    with torch.no_grad():
        assert torch.equal(swapped(x), _call(rec, x, model[0].bias))


# ----------------------------------------------------------------------------- on the native 4-bit kernel

needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.unavailable_reason()}")
NATIVE = torch.ops.lowbit.native_linear


def _native_args(rec, bias=None):
    return cpu_native.op_args(cpu_native.pack_native(rec), rec.su, rec.sv, bias)


def _int8_bound(rec, x):
    """1.5 × the expected ℓ2 error of each row from int8-rounding the rotated activations (test_cpu_native.py)."""
    factor = cpu_native.factor_block(list(cpu.rotation_blocks(rec.in_features)), rec.in_features)
    h = native.hadamard(x.reshape(-1, rec.in_features), rec.su, factor)
    m, k = h.shape
    d = h.view(m, -1, 32).abs().amax(-1, keepdim=True).expand(m, k // 32, 32).reshape(m, k).double() / 127
    w = rec.rotated_weight().double()
    return 1.5 * ((d * d) @ (w * w).t() / 12).sum(-1).sqrt()


@needs_native
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("tuned", [False, True])
def test_native_digits_match_the_reference_op(bits, tuned):
    rec = _record(bits, (344, 192), tuned=tuned)
    pack = cpu_native.pack_native(rec)
    assert pack.bits == 4 and pack.zero == 7.5 and pack.packed.shape[0] == 344 * rec.e8_format.stages
    assert cpu_native.dequantize(pack.packed, pack.scales, 4, 7.5, 192, 344).equal(rec.rotated_weight())
    bias = torch.randn(344)
    x = torch.randn(4, 192)
    y, y_ref = NATIVE(x, *_native_args(rec, bias)), _call(rec, x, bias)
    err = (y - y_ref).double().norm(dim=-1)
    assert bool((err <= _int8_bound(rec, x) + 1e-5 * y_ref.double().norm(dim=-1)).all())
    assert bool((err > 0).any())
    rows = native.default_prefill_rows("int8", 4)
    xp = torch.randn(rows + 3, 192)
    y, y_ref = NATIVE(xp, *_native_args(rec, bias)), _call(rec, xp, bias)
    assert bool(((y - y_ref).norm(dim=-1) <= 1e-5 * y_ref.norm(dim=-1)).all())


@needs_native
def test_native_opcheck_and_gradients_with_two_stages():
    rec = _record(4, (96, 192))
    x = torch.randn(4, 192, requires_grad=True)
    torch.library.opcheck(NATIVE.default, (x, *_native_args(rec, torch.randn(96))))
    x_ref = x.detach().clone().requires_grad_()
    g = torch.randn(4, 96)
    NATIVE(x, *_native_args(rec)).backward(g)
    _call(rec, x_ref).backward(g)
    assert (x.grad - x_ref.grad).norm() <= 1e-5 * x_ref.grad.norm()


@needs_native
def test_e8_records_choose_native_and_swap_linears_fast_uses_it(monkeypatch):
    rec = _record(3, (96, 192))
    choice = cpu_caps.choose_for(rec)
    assert choice.kernel == "native" and "two 4-bit passes" in choice.reason
    assert cpu_caps.choose_for(rec, "reference").kernel == "reference"
    assert cpu_caps.choose_e8(2, "meta").kernel == "reference"
    monkeypatch.setenv(cpu_caps.KERNEL_ENV, "reference")
    assert cpu_caps.choose_for(rec).kernel == "reference"
    monkeypatch.delenv(cpu_caps.KERNEL_ENV)
    model = torch.nn.Sequential(torch.nn.Linear(192, 96)).eval()
    fast = swap_linears(model, {"0": rec}, fast=True)
    assert isinstance(fast[0], NativeLinear) and "digits of e8p3" in fast[0].runtime
    x = torch.randn(1, 192)
    with torch.no_grad():
        y, y_ref = fast(x), swap_linears(model, {"0": rec})(x)
    assert (y - y_ref).norm() <= 0.02 * y_ref.norm()
