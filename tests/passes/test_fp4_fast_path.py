"""passes/fp4_fast_path.py on small hand-built graphs: which lowbit::fp4_linear nodes move to fp4pack_linear, the
fp4-rot rotation moving into the op (and its node going once unused), the graph's outputs, and enabled=False.
Numerics of the op itself: tests/kernels/test_cpu_fp4.py; on real HF graphs through the backend there too."""

import pytest
import torch

from lowbit_compile import hadamard
from lowbit_compile.kernels import cpu_fp4
from lowbit_compile.kernels.specs import FP4_LINEAR, FP4PACK_LINEAR, HADAMARD
from lowbit_compile.passes import FP4FastPath, layer_meta
from lowbit_compile.passes.base import QUANTIZED_TAG, RUNTIME
from lowbit_compile.quantize.layer import quantize_fp4_group
from lowbit_compile.recipe import parse_spec

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(cpu_fp4.unsupported_reason(torch.zeros(1, 1, dtype=torch.uint8)) is not None,
                                 reason="no fp4pack form on this CPU")]
K = 64


def _records(rotated: bool):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, K, generator=g)
    spec = parse_spec("fp4-rot" if rotated else "w4a16-fp4")
    layers = {name: (torch.randn(32, K, generator=g), spec) for name in ("a", "b")}
    return quantize_fp4_group(layers, x, None, seed=0)


def _graph(recs, share_rotation: bool):
    """x -> [hadamard] -> fp4_linear a, fp4_linear b (one rotation node shared by both, or one each); returns
    the GraphModule and its reference outputs on a test input."""
    gm = torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph())
    g = gm.graph
    x = g.placeholder("x")
    outs, rot = [], None
    for name, rec in recs.items():
        for t in ("qweight", "w_scales", "su"):
            if getattr(rec, t) is not None:
                gm.register_buffer(f"{name}_{t}", getattr(rec, t))
        inp = x
        if rec.su is not None:
            if rot is None or not share_rotation:
                factor = hadamard.factor(K)
                rot = HADAMARD.node(g, x=x, signs=g.get_attr(f"{name}_su"),
                                    factor=None if factor is None else g.get_attr("had"))
            inp = rot
        n = FP4_LINEAR.node(g, x=inp, qweight=g.get_attr(f"{name}_qweight"), w_scales=g.get_attr(f"{name}_w_scales"),
                            act_shift=None, act_scale=None, w_format=rec.w_format, a_format=None, bias=None,
                            in_features=K)
        n.meta[QUANTIZED_TAG] = name
        outs.append(n)
    g.output(tuple(outs))
    if hadamard.factor(K) is not None:
        gm.register_buffer("had", hadamard.factor(K))
    gm.recompile()
    xin = torch.randn(3, K, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = gm(xin)
    return gm, xin, ref


@pytest.mark.parametrize("rotated, share", [(False, False), (True, True), (True, False)])
def test_fp4_linears_move_to_fp4pack_and_rotations_move_inside(rotated, share):
    gm, xin, ref = _graph(_records(rotated), share)
    assert FP4FastPath()(gm).modified
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(FP4PACK_LINEAR.op) == 2 and FP4_LINEAR.op not in targets
    assert HADAMARD.op not in targets  # moved into the op, the unused node erased
    assert all(m[RUNTIME].startswith("fp4pack") for m in layer_meta(gm).values())
    with torch.no_grad():
        out = gm(xin)
    for y, r in zip(out, ref):
        assert float((y - r).norm() / r.norm()) < 1e-2  # bfloat16 activations (test_cpu_fp4 derives the bound)


def test_disabled_changes_nothing():
    gm, _, _ = _graph(_records(False), False)
    before = str(gm.graph)
    assert FP4FastPath(enabled=False)(gm).modified is False and str(gm.graph) == before
