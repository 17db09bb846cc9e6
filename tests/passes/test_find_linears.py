import torch
from tinymodels import tiny_llama

from lowbit_compile.passes import FindLinears, linear_sites
from lowbit_compile.passes.base import source_to_fqn


class TwoLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(12, 20)
        self.b = torch.nn.Linear(20, 12, bias=False)

    def forward(self, x, w):
        return torch.nn.functional.linear(self.b(torch.relu(self.a(x))), w)  # w: an input, not a constant


def test_source_names_become_fqns():
    assert source_to_fqn("L['self']._modules['model']._modules['layers']._modules['0']._modules['mlp']"
                         "._parameters['weight']") == "model.layers.0.mlp.weight"
    assert source_to_fqn("L['self'].model.layers[3].self_attn.q_proj") == "model.layers.3.self_attn.q_proj"
    assert source_to_fqn("G['net'].fc") == "fc"


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
