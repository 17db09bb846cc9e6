import torch

from lowbit_compile.passes import FindLinears, InsertObservers, observed_stats, remove_observers


class Attn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(12, 12)
        self.k = torch.nn.Linear(12, 12)
        self.o = torch.nn.Linear(12, 12)

    def forward(self, x):
        return self.o(torch.relu(self.q(x) * self.k(x)))


def test_observers_collect_each_linear_input_and_shared_inputs_share_one():
    model = Attn()
    gm = torch.fx.symbolic_trace(model)
    FindLinears()(gm)
    code_before = gm.code
    x = torch.randn(3, 4, 12)
    assert InsertObservers()(gm).modified
    out = gm(x)
    assert torch.equal(out, model(x))  # observers are pass-through
    stats = observed_stats(gm)
    assert set(stats) == {"q", "k", "o"} and stats["q"] is stats["k"]
    flat = x.reshape(-1, 12).double()
    assert torch.allclose(stats["q"].hessian(), flat.T @ flat / 12)
    h = torch.relu(model.q(x) * model.k(x)).reshape(-1, 12).double()
    assert torch.allclose(stats["o"].hessian(), h.T @ h / 12, atol=1e-10)
    assert remove_observers(gm).modified
    assert gm.code == code_before and not remove_observers(gm).modified
