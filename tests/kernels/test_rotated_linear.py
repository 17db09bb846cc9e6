import pytest
import torch

import lowbit_compile  # noqa: F401
from lowbit_compile import hadamard
from lowbit_compile.quantize.layer import quantize_weight
from lowbit_compile.recipe import parse_spec


def _args(rec, x, bias=None):
    t = rec.transform()
    return (x, rec.qweight, rec.scales, rec.su, rec.sv, t.had_in if t else None, t.had_out if t else None, bias,
            rec.bits, rec.in_features, rec.group_size)


@pytest.mark.parametrize("recipe", ["w2", "w3", "w4", "w8", "w4-rtn", "w2-g32", "w3-rtn-g32"])
@pytest.mark.parametrize("shape", [(96, 192), (344, 96), (40, 64)])
def test_op_equals_dense_dequantized_weight(recipe, shape):
    torch.manual_seed(0)
    w = torch.randn(*shape)
    rec = quantize_weight("layer", w, parse_spec(recipe), seed=1)
    x = torch.randn(3, 5, shape[1])
    b = torch.randn(shape[0])
    y = torch.ops.lowbit.rotated_linear(*_args(rec, x, b))
    ref = torch.nn.functional.linear(x.double(), rec.dequantized_weight().double(), b.double())
    assert y.shape == (3, 5, shape[0]) and y.dtype == torch.float32
    assert torch.allclose(y.double(), ref, atol=2e-5, rtol=1e-5)


def test_dequantized_weight_equals_explicit_u_w_v():
    w = torch.randn(96, 192)
    rec = quantize_weight("l", w, parse_spec("w4"), seed=3)
    u = hadamard.dense(96) @ torch.diag(rec.sv.double())
    v = hadamard.dense(192) @ torch.diag(rec.su.double())
    explicit = u.T @ rec.rotated_weight().double() @ v
    assert torch.allclose(rec.dequantized_weight().double(), explicit, atol=1e-6)


def test_opcheck_every_argument_combination():
    """Each record kind (rotated per channel, plain RTN, grouped scales) with and without a bias, and once per kind
    with inputs that need a gradient (the backward's registration and its AOT graph; a bias on every second kind)."""
    torch.manual_seed(0)
    w = torch.randn(48, 96)
    for i, recipe in enumerate(("w4", "w2-rtn", "w3-g32")):
        rec = quantize_weight("l", w, parse_spec(recipe), seed=0)
        biases = (None, torch.randn(48))
        for bias in biases:
            torch.library.opcheck(torch.ops.lowbit.rotated_linear.default, _args(rec, torch.randn(2, 3, 96), bias))
        x = torch.randn(2, 3, 96, requires_grad=True)
        torch.library.opcheck(torch.ops.lowbit.rotated_linear.default, _args(rec, x, biases[i % 2]))


def test_gradient_flows_to_activations():
    w = torch.randn(20, 24)
    rec = quantize_weight("l", w, parse_spec("w4"), seed=0)
    x = torch.randn(4, 24, requires_grad=True)
    torch.ops.lowbit.rotated_linear(*_args(rec, x)).pow(2).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    torch.nn.functional.linear(x2, rec.dequantized_weight()).pow(2).sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-4)


def test_bfloat16_activations_come_back_as_bfloat16():
    rec = quantize_weight("l", torch.randn(24, 48), parse_spec("w4"), seed=0)
    y = torch.ops.lowbit.rotated_linear(*_args(rec, torch.randn(2, 48).bfloat16()))
    assert y.dtype == torch.bfloat16
