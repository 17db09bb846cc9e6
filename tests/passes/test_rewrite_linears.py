import pytest
import torch
from tinymodels import exported_llama, with_weights

import lowbit_compile  # noqa: F401
from lowbit_compile.errors import LowbitError
from lowbit_compile.kernels.specs import ROTATED_LINEAR
from lowbit_compile.passes import FindLinears, RewriteLinears, count_quantized, linear_sites
from lowbit_compile.quantize.layer import quantize_weight
from lowbit_compile.recipe import parse_spec


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(96, 344)
        self.down = torch.nn.Linear(344, 96, bias=False)

    def forward(self, x):
        return x + self.down(torch.nn.functional.silu(self.up(x)))


def _records(model, names, recipe="w4"):
    return {n: quantize_weight(n, model.get_submodule(n).weight, parse_spec(recipe), seed=0) for n in names}


def test_rewrite_swaps_exactly_the_recorded_linears_and_matches_the_dequantized_model():
    torch.manual_seed(0)
    model = Block().eval()
    gm = torch.fx.symbolic_trace(model)
    FindLinears()(gm)
    recs = _records(model, ["up"])  # only one of the two
    res = RewriteLinears(recs)(gm)
    assert res.modified and count_quantized(gm) == 1
    assert [s.fqn for _, s in linear_sites(gm)] == ["down"]  # the float linear keeps its tag
    x = torch.randn(3, 96)
    assert torch.allclose(gm(x), with_weights(model, recs)(x), atol=1e-5)


def test_rewrite_without_records_reports_unmodified():
    gm = torch.fx.symbolic_trace(Block())
    FindLinears()(gm)
    assert RewriteLinears({})(gm).modified is False


def test_rewrite_on_a_real_llama_export_graph_keeps_meta_val_valid():
    model, ids, gm, names = exported_llama()
    recs = _records(model, names, "w3")
    RewriteLinears(recs)(gm)
    assert count_quantized(gm) == 14
    ops = [n for n in gm.graph.nodes if ROTATED_LINEAR.is_call(n)]
    assert all(tuple(n.meta["val"].shape)[-1] == ROTATED_LINEAR.args_of(n)["qweight"].meta["val"].shape[0]
               for n in ops)
    with torch.no_grad():
        assert torch.allclose(gm(ids).logits, with_weights(model, recs)(ids).logits, atol=1e-4)


def test_a_record_of_the_wrong_shape_is_refused_with_the_layer_name():
    model = Block()
    gm = torch.fx.symbolic_trace(model)
    FindLinears()(gm)
    wrong = quantize_weight("up", torch.randn(344, 48), parse_spec("w4"))
    with pytest.raises(LowbitError, match="layer up .*another model"):
        RewriteLinears({"up": wrong})(gm)
