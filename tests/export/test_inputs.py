"""export/inputs.py: the exporters make dynamic exactly the dimensions a model lets vary, so their defaults work
for any module: a plain MLP on (batch, features), a sequence model on (batch, sequence, features), keyword
inputs, batch-1 examples. Then both exporters end to end on a plain 2-D MLP with default arguments."""

import pytest
import torch

from lowbit_compile.export.inputs import free_dims, split_inputs, widen_size_one_dims
from lowbit_compile.quantize.layer import quantize_weight
from lowbit_compile.recipe import parse_spec

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.drift]


def _mlp(width=192):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, width)).eval()


class _Scaled(torch.nn.Module):
    """(batch, sequence, features) and a keyword input broadcast over the features."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(32, 16)

    def forward(self, x, scale=None):
        return self.fc(x) * scale


def test_a_weight_fixes_the_feature_dimension_of_a_2d_input():
    x = torch.randn(2, 192)
    assert free_dims(_mlp(), (x,), {}) == {id(x): {0}}


def test_batch_and_sequence_of_a_3d_input_are_free():
    x = torch.randn(2, 5, 192)
    assert free_dims(_mlp(), (x,), {}) == {id(x): {0, 1}}


def test_keyword_inputs():
    x, scale = torch.randn(2, 5, 32), torch.randn(2, 5, 1)
    assert free_dims(_Scaled(), (), {"scale": scale, "x": x}) == {id(x): {0, 1}, id(scale): {0, 1}}


def test_a_size_one_dimension_is_widened_only_where_the_model_runs():
    args, _, widened = widen_size_one_dims(_mlp(), (torch.randn(1, 192),), {})
    assert widened == [0] and args[0].shape == (2, 192)
    args, _, widened = widen_size_one_dims(_mlp(), (torch.randn(1, 1, 192),), {})
    assert widened == [0, 1] and args[0].shape == (2, 2, 192)
    one_feature = torch.nn.Sequential(torch.nn.Linear(1, 4))  # dimension 1 is a feature of size 1: not widened
    args, _, widened = widen_size_one_dims(one_feature, (torch.randn(3, 1),), {})
    assert widened == [] and args[0].shape == (3, 1)


def test_split_inputs():
    t = torch.zeros(1)
    assert split_inputs(t) == ((t,), {})
    assert split_inputs([t, t]) == ((t, t), {})
    assert split_inputs({"x": t}) == ((), {"x": t})
    with pytest.raises(Exception, match="example_inputs must be"):
        split_inputs("x")


@pytest.fixture(scope="module")
def mlp_records():
    model = _mlp()
    return model, {"0": quantize_weight("0", model[0].weight, parse_spec("w2")),
                   "2": quantize_weight("2", model[2].weight, parse_spec("w4"))}


@pytest.mark.parametrize("batch", [2, 1])
def test_a_2d_mlp_exports_to_pte_with_default_arguments(mlp_records, batch, tmp_path):
    pytest.importorskip("executorch")
    import lowbit_compile as lb
    from lowbit_compile.export.executorch import RTOL_INT8_ACTIVATIONS, max_rel_error, run_pte
    from lowbit_compile.nn import swap_linears

    model, records = mlp_records
    res = lb.export(model, records, (torch.randn(batch, 192),), tmp_path / "mlp.pte")
    assert [d.split(" ")[0] for d in res.dynamic_dims] == ["input.0"]  # the batch, never the features
    x = torch.randn(5, 192)
    with torch.no_grad():
        ref = swap_linears(model, records)(x)
    assert max_rel_error(run_pte(res.path, [x]), [ref]) <= RTOL_INT8_ACTIVATIONS  # w4 runs on XNNPACK int8 x int4


@pytest.mark.parametrize("batch", [2, 1])
def test_a_2d_mlp_exports_to_onnx_with_default_arguments(mlp_records, batch, tmp_path):
    pytest.importorskip("onnxruntime")
    import lowbit_compile as lb
    from lowbit_compile.export.onnx import ATOL, RTOL, run_onnx
    from lowbit_compile.nn import swap_linears

    model, records = mlp_records
    res = lb.export(model, records, (torch.randn(batch, 192),), tmp_path / "mlp.onnx")
    x = torch.randn(5, 192)
    with torch.no_grad():
        ref = swap_linears(model, records)(x)
    got = run_onnx(res.path, {"input": x})
    # float32 summation order only (export/onnx.py's verification tolerance says why)
    assert got.shape == (5, 192) and float((got - ref).abs().max()) <= RTOL * float(ref.abs().max()) + ATOL


@pytest.mark.parametrize("suffix", [".pte", ".onnx"])
def test_a_record_kind_without_a_route_is_refused_by_both_exporters_with_what_to_do(suffix, tmp_path):
    """A record kind no exporter has a route for: a clear error before any work, not integer codes misread."""
    import dataclasses

    import lowbit_compile as lb
    from lowbit_compile.quantize.records import QuantizedLinear

    @dataclasses.dataclass
    class VectorQuantized(QuantizedLinear):
        kind = "vq"

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32)).eval()
    rec = quantize_weight("0", model[0].weight, parse_spec("w2"))
    records = {"0": VectorQuantized(**{f.name: getattr(rec, f.name) for f in dataclasses.fields(rec)})}
    with pytest.raises(lb.LowbitError, match=r"1 layer\(s\) \(0\) hold vq records.*export int, fp4, e8 records"):
        lb.export(model, records, (torch.randn(2, 64),), tmp_path / f"m{suffix}")
    assert not (tmp_path / f"m{suffix}").exists()
