"""lowbit::fp4_linear: opcheck, equality with an explicit dequantize-then-matmul, accuracy, fold readiness."""

import pytest
import torch

import lowbit_compile.kernels.fp4_ops  # noqa: F401  (registers lowbit::fp4_linear)
from lowbit_compile.errors import LowbitError
from lowbit_compile.formats import fp4 as f4
from lowbit_compile.quantize import fp4 as q

op = torch.ops.lowbit.fp4_linear.default
GRID = (0.5, 0.7, 0.85, 1.0)


pytestmark = pytest.mark.usefixtures("one_thread")


def make_layer(m=24, n=37, w_fmt="e2m1", a_fmt="e2m1", shift=True, seed=0):
    """Random op arguments: codes, float16 per-row scales, shifts and an activation scale."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (m, n), dtype=torch.uint8, generator=g)
    w_scales = (torch.rand(m, 1, generator=g) * 0.1 + 0.01).to(torch.float16)
    act_shift = torch.randint(0, 4, (n,), dtype=torch.uint8, generator=g) if shift else None
    act_scale = torch.tensor([0.37], dtype=torch.float16) if a_fmt else None
    return dict(qweight=f4.pack_codes(codes), w_scales=w_scales, act_shift=act_shift, act_scale=act_scale,
                w_format=w_fmt, a_format=a_fmt, in_features=n), codes


def call(x, args, bias=None):
    return op(x, args["qweight"], args["w_scales"], args["act_shift"], args["act_scale"], args["w_format"],
              args["a_format"], bias, args["in_features"])


def explicit(x, codes, args, bias=None):
    """Independent path: grid lookup on the unpacked codes, activations rounded by a nearest search."""
    w = f4.fp4_format(args["w_format"]).grid(0.0)[codes.long()] * args["w_scales"].float()
    h = x.float()
    if args["act_shift"] is not None:
        h = h * 2.0 ** args["act_shift"].float()
    if args["a_format"] is not None:
        s = args["act_scale"].float()
        grid = f4.fp4_format(args["a_format"]).grid(0.0) * s
        nearest = (h.unsqueeze(-1) - grid).abs().argmin(dim=-1)  # first minimum; ties are measure-zero here
        h = grid[nearest]
    y = h @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


CASES = [
    ("e2m1", None, False, torch.float32, (5, 37), False),   # W4A16
    ("e1m2", None, True, torch.bfloat16, (2, 3, 37), True),
    ("e2m1", "e2m1", True, torch.float32, (4, 37), True),
    ("e3m0", "e1m2", False, torch.float16, (1, 37), False),
    ("e1m2", "e3m0", True, torch.float32, (3, 2, 37), True),
]


@pytest.mark.parametrize("w_fmt,a_fmt,shift,dtype,shape,with_bias", CASES)
def test_opcheck(w_fmt, a_fmt, shift, dtype, shape, with_bias):
    args, _ = make_layer(w_fmt=w_fmt, a_fmt=a_fmt, shift=shift)
    x = torch.randn(shape).to(dtype)
    bias = torch.randn(24).to(dtype) if with_bias else None
    torch.library.opcheck(op, (x, args["qweight"], args["w_scales"], args["act_shift"], args["act_scale"],
                               w_fmt, a_fmt, bias, 37))


@pytest.mark.parametrize("w_fmt,a_fmt,shift,dtype,shape,with_bias", CASES)
def test_equals_explicit_dequantize_then_matmul(w_fmt, a_fmt, shift, dtype, shape, with_bias):
    args, codes = make_layer(w_fmt=w_fmt, a_fmt=a_fmt, shift=shift, seed=1)
    x = torch.randn(shape).to(dtype)
    bias = torch.randn(24).to(dtype) if with_bias else None
    y = call(x, args, bias)
    assert y.dtype == dtype and y.shape == (*shape[:-1], 24)
    ref = explicit(x, codes, args, bias)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5) if dtype == torch.float32 else \
        torch.testing.assert_close(y, ref)


def test_fake_output_is_fresh():
    args, _ = make_layer()
    x = torch.randn(3, 37, device="meta")
    y = op(x, args["qweight"].to("meta"), args["w_scales"].to("meta"), args["act_shift"].to("meta"),
           args["act_scale"].to("meta"), "e2m1", "e2m1", None, 37)
    assert y.shape == (3, 24) and y.device.type == "meta"


def calib(seed=0, tokens=256, n=64, m=48):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g)
    x[:, [5, 40]] *= 30
    w = torch.randn(m, n, generator=g) / n**0.5
    return x, w


def test_w4a16_is_close_to_the_float_linear():
    x, w = calib()
    res = q.search_fp4_layer(x, w, act_quant=False, clip_grid=GRID)
    b = torch.randn(w.shape[0])
    y = op(x, res.qweight, res.w_scales, None, None, res.w_format.name, None, b, res.in_features)
    ref = torch.nn.functional.linear(x, w, b)
    rel = (y - ref).norm() / ref.norm()
    assert rel < 0.12, f"W4A16 relative output error {rel:.3f}"


def test_op_reproduces_the_search_loss():
    x, w = calib(seed=1)
    res = q.search_fp4_layer(x, w, clip_grid=GRID, rounds=2)
    assert res.act_exponents is not None
    y = op(x, res.qweight, res.w_scales, res.act_exponents, res.act_scale, res.w_format.name,
           res.a_format.name, None, res.in_features)
    mse = float((y.double() - x.double() @ w.double().T).pow(2).mean())
    assert mse == pytest.approx(res.loss, rel=1e-4)
    assert torch.equal(y, res.quantize_input(x) @ res.dequantized_weight().T)


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_shift_folded_into_a_norm_gives_identical_outputs(norm):
    """What the fold pass will do: multiply the norm's weight (and bias) by 2**k, pass act_shift=None."""
    x, w = calib(seed=2)
    h = torch.randn(x.shape) * 3 + 1
    n = x.shape[1]
    gamma, beta = torch.randn(n).abs() + 0.5, torch.randn(n) * 0.1
    gamma[[5, 40]] *= 30
    if norm == "layernorm":
        def f(t, g, b):
            return torch.nn.functional.layer_norm(t, (n,), g, b)
    else:
        def f(t, g, b):
            return torch.nn.functional.rms_norm(t, (n,), g)
    res = q.search_fp4_layer(f(h, gamma, beta), w, clip_grid=GRID, rounds=1)
    k = res.act_exponents
    assert k is not None
    args = (res.qweight, res.w_scales)
    tail = (res.w_format.name, res.a_format.name, None, n)
    y = op(f(h, gamma, beta), *args, k, res.act_scale, *tail)
    mult = f4.exponent_multipliers(k)
    y_folded = op(f(h, gamma * mult, beta * mult), *args, None, res.act_scale, *tail)
    assert torch.equal(y, y_folded)


def test_missing_act_scale_is_a_user_error():
    args, _ = make_layer()
    args["act_scale"] = None
    with pytest.raises(LowbitError, match="act_scale"):
        call(torch.randn(2, 37), args)
