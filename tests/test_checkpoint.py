"""Checkpoint.match: a checkpoint finds its layers in a graph whatever the graph calls them (the same name, a name
with a prefix, or only the weight's content), and says what it tried when it cannot."""

import pytest
import torch

import lowbit_compile as lb
from lowbit_compile.checkpoint import Checkpoint, weight_digest

pytestmark = [pytest.mark.usefixtures("fresh_compiler"), pytest.mark.drift]


def _mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.ReLU(), torch.nn.Linear(24, 16)).eval()


@pytest.fixture(scope="module")
def ckpt():
    return lb.quantize(_mlp(), "w4", None, progress=False)


def _shapes(model, prefix=""):
    return {prefix + n: (m.out_features, m.in_features) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)}


def test_records_keep_the_digest_of_their_float_weight(ckpt, tmp_path):
    model = _mlp()
    assert ckpt.records["0"].weight_sha256 == weight_digest(model[0].weight)
    assert ckpt.records["0"].weight_sha256 != weight_digest(model[2].weight)
    loaded = Checkpoint.load(ckpt.save(str(tmp_path / "ck")))
    assert {f: r.weight_sha256 for f, r in loaded.records.items()} == \
        {f: r.weight_sha256 for f, r in ckpt.records.items()}


def test_match_by_name(ckpt):
    names, tried = ckpt.match(_shapes(_mlp()))
    assert names == {"0": "0", "2": "2"} and tried[0] == "by name: 2"


def test_match_by_the_end_of_the_name_and_the_shape(ckpt):
    names, tried = ckpt.match(_shapes(_mlp(), prefix="inner."))
    assert names == {"inner.0": "0", "inner.2": "2"} and tried[1] == "by the name's ending and the shape: 2"


def test_match_by_weight_content_when_names_say_nothing(ckpt):
    model = _mlp()
    weights = {"first": model[0].weight, "second": model[2].weight}
    names, tried = ckpt.match({"first": (24, 16), "second": (16, 24)}, weight=weights.__getitem__)
    assert names == {"first": "0", "second": "2"} and tried[2] == "by the weight's content (sha256): 2"


def test_other_weights_do_not_match_and_the_error_says_what_was_tried(ckpt):
    other = _mlp(seed=1)
    weights = {"first": other[0].weight, "second": other[2].weight}
    linears = {"first": (24, 16), "second": (16, 24)}
    names, tried = ckpt.match(linears, weight=weights.__getitem__)
    assert names == {}
    with pytest.raises(lb.LowbitError, match=r"(?s)first: a linear of this model that the checkpoint does not know"
                                             r".*by the weight's content \(sha256\): 0"):
        ckpt.check(linears, where="the compiled graph", tried=tried)


def test_a_checkpoint_without_digests_still_loads_and_matches_by_name(ckpt, tmp_path):
    import json

    path = ckpt.save(str(tmp_path / "old"))
    meta_path = tmp_path / "old" / "lowbit.json"
    meta = json.loads(meta_path.read_text())
    for rec in meta["records"].values():
        del rec["weight_sha256"]  # as written before records kept a digest
    del meta["meta_sha256"]
    meta_path.write_text(json.dumps(meta))
    old = Checkpoint.load(path)
    assert old.records["0"].weight_sha256 is None
    names, tried = old.match({"x": (24, 16)}, weight=lambda n: _mlp()[0].weight)
    assert names == {} and "not tried (the checkpoint stores no weight digests)" in tried[2]


class _Wrapper(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) * 2


def test_a_checkpoint_compiles_into_a_wrapper_and_a_function_of_its_model(ckpt):
    model = _mlp()
    x = torch.randn(3, 16)
    options = {"checkpoint": ckpt, "compiler": "eager", "kernels": "reference"}
    with torch.no_grad():
        direct = torch.compile(model, backend="lowbit", options=options)(x)
        assert {r.fqn for r in lb.last_report().quantized} == {"0", "2"}
        torch._dynamo.reset()
        wrapped = torch.compile(_Wrapper(model), backend="lowbit", options=options)(x)
        assert {r.fqn for r in lb.last_report().quantized} == {"0", "2"}  # the checkpoint's names
        torch._dynamo.reset()
        via_fn = torch.compile(lambda t: model(t) + 1, backend="lowbit", options=options)(x)
    assert torch.equal(wrapped, 2 * direct) and torch.equal(via_fn, direct + 1)
    assert not torch.allclose(direct, model(x), atol=1e-4)  # the quantized weights really ran
