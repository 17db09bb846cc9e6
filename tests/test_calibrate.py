import pytest
import torch
from tinymodels import minilm, tiny_llama

from lowbit_compile.calibrate import HessianAccumulator, calibrate_blocks, find_blocks
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
