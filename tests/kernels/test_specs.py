"""kernels/specs.py: op arguments by name, read from each op's schema."""

import pytest
import torch

import lowbit_compile  # noqa: F401  (registers the ops)
from lowbit_compile.errors import LowbitError
from lowbit_compile.kernels.specs import FP4_LINEAR, HADAMARD, LINEAR_OPS, ROTATED_LINEAR


def test_names_come_from_the_schema():
    assert FP4_LINEAR.names == ("x", "qweight", "w_scales", "act_shift", "act_scale", "w_format", "a_format", "bias",
                                "in_features")
    assert all(s.names[0] == "x" for s in LINEAR_OPS)


def test_a_node_built_positionally_or_by_keyword_reads_the_same():
    g = torch.fx.Graph()
    x, s, f = g.placeholder("x"), g.placeholder("s"), g.placeholder("f")
    positional = g.call_function(HADAMARD.op, (x, s, f))
    keyword = HADAMARD.node(g, x=x, signs=s, factor=f)
    assert HADAMARD.args_of(positional) == HADAMARD.args_of(keyword) == {"x": x, "signs": s, "factor": f,
                                                                           "inverse": False}
    assert keyword.args == () and set(keyword.kwargs) == set(HADAMARD.names)


def test_update_changes_named_arguments_in_place():
    g = torch.fx.Graph()
    x, s, f = g.placeholder("x"), g.placeholder("s"), g.placeholder("f")
    n = g.call_function(HADAMARD.op, (x, s, f))
    HADAMARD.update(n, inverse=True, factor=None)
    assert HADAMARD.args_of(n) == {"x": x, "signs": s, "factor": None, "inverse": True}


def test_unknown_and_missing_names_are_errors_that_list_the_arguments():
    g = torch.fx.Graph()
    x = g.placeholder("x")
    with pytest.raises(LowbitError, match=r"lowbit::hadamard has no argument\(s\) \['sign'\]; its arguments: "):
        HADAMARD.node(g, x=x, sign=x)
    with pytest.raises(LowbitError, match=r"argument 'signs' is missing"):
        HADAMARD.node(g, x=x)
    with pytest.raises(LowbitError, match="is not a call of lowbit::rotated_linear"):
        ROTATED_LINEAR.args_of(x)


def test_calling_by_keyword_runs_the_op():
    x = torch.randn(3, 16)
    signs = torch.ones(16)
    assert torch.allclose(HADAMARD(x=x, signs=signs, factor=None), torch.ops.lowbit.hadamard(x, signs, None))
