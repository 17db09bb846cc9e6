"""passes/manager.py: one ordered pass list, built from a context, failures naming the pass."""

import pytest
import torch
from tinymodels import exported_llama

from lowbit_compile.errors import LowbitError
from lowbit_compile.passes import REWRITE, REWRITE_PASSES, PassContext, PassManager, layer_meta
from lowbit_compile.passes.base import KERNEL_REASON, RUNTIME, PassBase, PassResult
from lowbit_compile.quantize.layer import quantize_weight
from lowbit_compile.recipe import parse_spec


class _Record(PassBase):
    seen: list = []

    def __init__(self, tag):
        super().__init__()
        self.tag = tag

    @classmethod
    def from_context(cls, ctx):
        return cls(ctx.kernels)

    def call(self, gm):
        _Record.seen.append(self.tag)
        return PassResult(gm, False)


class _Broken(PassBase):
    def call(self, gm):
        raise KeyError("boom")


def test_passes_run_in_order_from_the_context_and_a_failure_names_the_pass_and_those_before():
    gm = torch.fx.symbolic_trace(torch.nn.Linear(4, 4))
    _Record.seen = []
    result = PassManager([_Record, _Record])(gm, PassContext(kernels="auto"))
    assert _Record.seen == ["auto", "auto"] and result.modified is False
    with pytest.raises(LowbitError, match=r"graph pass _Broken failed \(after _Record\): KeyError: 'boom'"):
        PassManager([_Record, _Broken])(gm, PassContext())
    assert "RewriteLinears -> RewriteEmbeddings -> FoldActScales -> FP4FastPath" in repr(REWRITE)


def test_the_rewrite_list_leaves_what_it_did_in_node_meta():
    model, ids, gm, names = exported_llama(layers=1)
    recs = {n: quantize_weight(n, model.get_submodule(n).weight, parse_spec("w3")) for n in names}
    result = REWRITE(gm, PassContext(recs, "reference"))
    assert result.modified and list(REWRITE_PASSES)[0].__name__ == "RewriteLinears"
    done = layer_meta(gm)
    assert set(done) == set(names)
    assert all(m[RUNTIME].startswith("rotated_linear 3.") and m[KERNEL_REASON] == "kernels='reference'"
               for m in done.values())
