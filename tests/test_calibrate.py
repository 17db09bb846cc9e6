import pytest
import torch
from tinymodels import minilm, tiny_llama

import lowbit_compile as lb
from lowbit_compile.calibrate import HessianAccumulator, calibrate_blocks, find_blocks, named_linears, units_of
from lowbit_compile.errors import LowbitError


def test_accumulator_is_the_float64_second_moment_and_channel_max():
    acc = HessianAccumulator(6, "l")
    xs = [torch.randn(2, 5, 6), torch.randn(7, 6)]
    for x in xs:
        acc.add(x)
    x = torch.cat([t.reshape(-1, 6) for t in xs]).double()
    assert acc.tokens == 17
    assert torch.allclose(acc.hessian(), x.T @ x / 17, atol=1e-12)
    assert torch.equal(acc.absmax, x.abs().amax(0).float())


def test_accumulator_refuses_non_finite_activations_and_empty_use():
    acc = HessianAccumulator(3, "model.layers.0.mlp.down_proj")
    with pytest.raises(LowbitError, match="no calibration tokens reached this layer"):
        acc.hessian()
    with pytest.raises(LowbitError, match="down_proj: calibration activations contain NaN or Inf"):
        acc.add(torch.tensor([[1.0, float("nan"), 0.0]]))


def test_an_accumulator_whose_hessian_another_rank_sums_keeps_maxima_and_rows_and_says_where_the_hessian_is():
    acc = HessianAccumulator(3, "model.layers.0.mlp.down_proj", deferred=True)
    acc.add(torch.tensor([[1.0, -2.0, 0.5]]))
    acc.sum_on(1, here=False)
    acc.fold([(None, torch.tensor([3.0, 0.0, 0.0]), 4)])  # another rank's call: its maxima and rows only
    assert acc.tokens == 4 and torch.equal(acc.absmax, torch.tensor([3.0, 0.0, 0.0]))
    with pytest.raises(LowbitError, match="down_proj: its Hessian was summed on rank 1"):
        acc.hessian()


def test_blocks_are_found_in_decoder_and_encoder_models():
    name, blocks = find_blocks(tiny_llama(layers=3))
    assert name == "model.layers" and len(blocks) == 3
    name, blocks = find_blocks(minilm()[0])
    assert name == "encoder.layer" and len(blocks) == 6


def _run_calibration(model, sequential):
    seen = {}

    def quantize_layers(linears, stats):
        seen.update(stats)
        # pretend to quantize: a visibly different weight, so sequential mode changes what later blocks see
        return {f: lin.weight * 0.5 for f, lin in linears.items()}

    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 320, (2, 12), generator=g), torch.randint(0, 320, (1, 7), generator=g)]
    summary = calibrate_blocks(model, batches, quantize_layers, sequential=sequential, progress=False)
    return seen, summary


def test_sequential_and_parallel_modes_both_run_on_a_llama_graph_and_differ_where_they_should():
    model = tiny_llama()
    before = {n: p.clone() for n, p in model.named_parameters()}
    seq, summary = _run_calibration(model, True)
    par, _ = _run_calibration(model, False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # weights restored
    assert summary.tokens == 31 and summary.blocks == ["model.layers.0", "model.layers.1"]
    assert set(seq) == {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    q0 = "model.layers.0.self_attn.q_proj"
    assert torch.allclose(seq[q0].hessian, par[q0].hessian)  # the first block sees the same inputs
    q1 = "model.layers.1.self_attn.q_proj"
    assert not torch.allclose(seq[q1].hessian, par[q1].hessian)  # later blocks see quantized inputs
    assert seq[q1].hessian is seq["model.layers.1.self_attn.k_proj"].hessian  # q/k/v share one H
    assert seq[q1].tokens == 31
    assert all(0 < v < 2 for v in summary.lim.values())


def test_batches_that_do_not_fit_the_model_get_a_clear_error():
    model = tiny_llama(layers=1)
    with pytest.raises(LowbitError, match="calibration batch 1 does not fit the model"):
        calibrate_blocks(model, [torch.randint(0, 320, (1, 4)), torch.full((1, 4), 10_000)],
                         lambda lin, st: {}, progress=False)
    with pytest.raises(LowbitError, match="the calibration set is empty"):
        calibrate_blocks(model, [], lambda lin, st: {}, progress=False)
    with pytest.raises(LowbitError, match="calibration batch 0 is a int"):
        calibrate_blocks(model, [3], lambda lin, st: {}, progress=False)


# ----------------------------------------------------------------------------- plain torch models (no HF)


class MLPBlock(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc1, self.act, self.fc2 = torch.nn.Linear(d, 2 * d), torch.nn.GELU(), torch.nn.Linear(2 * d, d)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Stack(torch.nn.Module):
    """A plain module looping over `self.layers`, an nn.ModuleList of blocks."""

    def __init__(self, blocks):
        super().__init__()
        self.layers = torch.nn.ModuleList(blocks)

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return x


def _stack(kind, d=32):
    torch.manual_seed(0)
    return Stack([MLPBlock(d) if kind == "mlp" else torch.nn.Linear(d, d) for _ in range(2)])


def test_a_block_that_is_itself_a_linear_is_named_like_the_model_names_it():
    model = _stack("linear")
    assert list(named_linears(model.layers[1], "layers.1")) == ["layers.1"]  # was "layers.1." (trailing dot)
    assert {f for unit in units_of(model).values() for f in unit} == {"layers.0", "layers.1"}


# 2 bits over two linears with no residual in between lands near cos 0.88 on random weights; 4 bits near 0.99
@pytest.mark.parametrize("recipe,min_cos", [("fp4", 0.95), ("w4", 0.97), ("w2", 0.8)])
@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_a_plain_module_list_model_quantizes_and_stays_close_to_float(kind, recipe, min_cos):
    model = _stack(kind)
    g = torch.Generator().manual_seed(0)
    calibration = [torch.randn(2, 16, 32, generator=g) for _ in range(2)]
    ck = lb.quantize(model, recipe, calibration, progress=False)
    assert set(ck.records) == {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    x = torch.randn(3, 8, 32, generator=g)
    with torch.no_grad():
        ref, out = model(x), lb.swap_linears(model, ck.records)(x)
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > min_cos
    if recipe == "fp4":  # sequential: the second block is calibrated on what the first one's W4A4 form outputs
        par = lb.quantize(model, recipe, calibration, sequential=False, progress=False)
        second = "layers.1" if kind == "linear" else "layers.1.fc1"
        assert not torch.equal(par.records[second].act_scale, ck.records[second].act_scale)


def test_a_shard_deals_the_batches_largest_first_in_a_snake_and_every_batch_once():
    """The fold order and each rank's share (calibrate.Shard; no process group needed to decide them)."""
    from lowbit_compile.calibrate import Shard

    lengths = [61, 33, 50, 40, 45, 51, 52, 41]  # MiniLM's default calibration: 16 sentences padded to these
    batches = [torch.zeros(16, n, dtype=torch.long) for n in lengths]
    one = Shard(0, 1, balance=True).over(batches)
    assert [lengths[b] for b in one.order] == sorted(lengths, reverse=True)
    assert one.mine(lengths) == sorted(lengths, reverse=True) and one.rounds() == 8
    ranks = [Shard(r, 2, balance=True).over(batches) for r in (0, 1)]
    shares = [s.mine(lengths) for s in ranks]
    assert shares == [[61, 50, 45, 33], [52, 51, 41, 40]]  # positions 0, 3, 4, 7 | 1, 2, 5, 6
    assert [ranks[0].index(j) for j in range(4)] == [0, 2, 4, 1]
    assert abs(sum(shares[0]) - sum(shares[1])) <= 10  # 189 / 184 tokens; batch b % 2 would give 208 / 165
    three = [Shard(r, 3, balance=True).over(batches[:7]) for r in range(3)]  # a last round with one batch
    assert sorted(b for s in three for b in s.mine(list(range(7)))) == list(range(7))
    assert [s.rounds() for s in three] == [3, 3, 3] and [len(s.mine(lengths[:7])) for s in three] == [3, 2, 2]
    assert Shard().over(batches).order == tuple(range(8))  # no balance: the batches' own order
