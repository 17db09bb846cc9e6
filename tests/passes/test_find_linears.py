import functools

import pytest
import torch
from tinymodels import tiny_llama

from lowbit_compile.passes import FindLinears, linear_sites
from lowbit_compile.passes.base import source_root, source_to_fqn

pytestmark = pytest.mark.drift  # in the drift subset (.ci/run): newest allowed releases


class TwoLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(12, 20)
        self.b = torch.nn.Linear(20, 12, bias=False)

    def forward(self, x, w):
        return torch.nn.functional.linear(self.b(torch.relu(self.a(x))), w)  # w: an input, not a constant


@pytest.mark.parametrize("source, fqn", [
    ("L['self']._modules['model']._modules['layers']._modules['0']._modules['mlp']._parameters['weight']",
     "model.layers.0.mlp.weight"),
    # transformers >= 5.24 wraps forward: the model arrives as the wrapper's first positional argument
    ("L['args'][0]._modules['model']._modules['layers']._modules['0']._modules['self_attn']._modules['q_proj']"
     "._parameters['weight']", "model.layers.0.self_attn.q_proj.weight"),
    ("L['fn']._modules['0']._parameters['weight']", "0.weight"),  # torch.compile(module)
    ("L['fn'].__self__._modules['0']._parameters['weight']", "0.weight"),  # torch.compile(module.forward)
    ("G['mlp']._modules['2']._parameters['bias']", "2.bias"),  # a function using a global model
    ("L['m']._modules['0']._parameters['weight']", "0.weight"),  # a closure's model, or a model argument
    ("G['__import_pkg_mod'].net._modules['fc']._parameters['weight']", "fc.weight"),  # a model in another module
    ("L['fn']._parameters['weight']", "weight"),  # a bare nn.Linear
    ("L['self'].model.layers[3].self_attn.q_proj", "model.layers.3.self_attn.q_proj"),  # attribute spelling
    ("L['args'][0].model.layers[3]", "model.layers.3"),
    ("L['m'].0", "0"),  # a module-stack path
    ("G['net'].fc", "fc"),
    ("model.layers.0.q_proj", "model.layers.0.q_proj"),  # torch.export module stacks have no root
])
def test_source_names_become_fqns_whatever_the_root(source, fqn):
    assert source_to_fqn(source) == fqn


def test_source_root():
    assert source_root("L['args'][0]._modules['x']") == "args"
    assert source_root("G['mlp'].fc") == "mlp"
    assert source_root("model.fc") == ""


def test_fx_graph_get_attr_weights_are_tagged_and_inputs_are_not():
    gm = torch.fx.symbolic_trace(TwoLayer())
    res = FindLinears()(gm)
    assert res.modified is False  # tags are metadata; the graph is unchanged
    sites = [s for _, s in linear_sites(gm)]
    assert [(s.fqn, s.in_features, s.out_features, s.has_bias) for s in sites] == [
        ("a", 12, 20, True), ("b", 20, 12, False)]


def _dynamo_sites(model, *args):
    """Run FindLinears inside a backend: Dynamo drops the placeholders' example tensors afterwards."""
    found = []

    def capture(gm, example_inputs):
        FindLinears()(gm)
        found.extend(s for _, s in linear_sites(gm))
        return gm.forward

    with torch.no_grad():
        torch._dynamo.reset()
        torch.compile(model, backend=capture)(*args)
    return found


def test_dynamo_graph_of_llama_names_every_linear_and_spots_the_tied_head():
    model = tiny_llama(tie=True)
    sites = {s.fqn: s for s in _dynamo_sites(model, torch.randint(0, 320, (1, 6)))}
    names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(sites) == names and len(sites) == 15
    head = sites["lm_head"]
    assert head.weight_name == "model.embed_tokens.weight" and head.tied
    assert not sites["model.layers.0.mlp.down_proj"].tied
    assert (sites["model.layers.1.mlp.down_proj"].in_features, sites["model.layers.1.mlp.down_proj"].out_features) \
        == (344, 192)


def test_torch_export_graph_uses_the_signature_names():
    model = tiny_llama()
    model.config.use_cache = False
    with torch.no_grad():
        ep = torch.export.export(model, (torch.randint(0, 320, (1, 6)),), strict=False)
    gm = ep.graph_module
    FindLinears(ep.graph_signature.inputs_to_parameters)(gm)
    sites = [s for _, s in linear_sites(gm)]
    assert len(sites) == 15
    assert {s.fqn for s in sites} == {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.ReLU(), torch.nn.Linear(20, 12)).eval()


class _Wrapped(torch.nn.Module):
    """A forward re-decorated the way transformers 5.24 does it (the model becomes args[0] for Dynamo)."""

    def __init__(self):
        super().__init__()
        self.net = _mlp()

    @staticmethod
    def _decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            return fn(*args, **kwargs)

        return wrapper

    def forward(self, x):
        return self.net(x)


_Wrapped.forward = _Wrapped._decorate(_Wrapped.forward)
_GLOBAL_MLP = _mlp()


def _calls_global(x):
    return _GLOBAL_MLP(x)


def _closure():
    m = _mlp()
    return lambda x: m(x)


def _takes_model(model, x):
    return model(x)


@pytest.mark.parametrize("how", ["module", "bound method", "global in a function", "closure", "model argument",
                                 "decorated forward"])
def test_dynamo_names_do_not_depend_on_how_the_model_is_called(how):
    x = torch.randn(3, 12)
    if how == "module":
        sites = _dynamo_sites(_mlp(), x)
    elif how == "bound method":
        sites = _dynamo_sites(_mlp().forward, x)
    elif how == "global in a function":
        sites = _dynamo_sites(_calls_global, x)
    elif how == "closure":
        sites = _dynamo_sites(_closure(), x)
    elif how == "model argument":
        sites = _dynamo_sites(_takes_model, _mlp(), x)
    else:
        sites = _dynamo_sites(_Wrapped(), x)
        assert {s.fqn for s in sites} == {"net.0", "net.2"}
        return
    assert [(s.fqn, s.weight_name) for s in sites] == [("0", "0.weight"), ("2", "2.weight")]


def test_a_function_calling_two_models_qualifies_names_when_they_collide():
    enc, dec = _mlp(), torch.nn.Sequential(torch.nn.Linear(12, 12))

    def both(x):
        return dec(enc(x))

    sites = {s.fqn for s in _dynamo_sites(both, torch.randn(3, 12))}
    assert sites == {"enc.0", "enc.2", "dec.0"}  # "0" is in both models
