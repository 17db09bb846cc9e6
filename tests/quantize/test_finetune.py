"""Block fine-tuning (quantize/finetune.py) on a tiny Llama: the float-model targets follow the float trajectory
whatever the quantized inputs are, tuning lowers a block's output error against them, and it is deterministic.
(lb.quantize with "w2-e8-ft" end to end: tests/test_e8_pipeline.py.)"""

import pytest
import torch
from tinymodels import tiny_llama

from lowbit_compile.quantize import finetune
from lowbit_compile.quantize.e8 import quantize_e8_linear

pytestmark = pytest.mark.usefixtures("one_thread")


def _calls(model, ids):
    """Each block's (args, kwargs) on the float model's forward of `ids`, and the float hidden states after it."""
    calls, outs = {}, {}
    handles = []
    for i, block in enumerate(model.model.layers):
        def hook(mod, args, kwargs, out, i=i):
            calls[i] = (args, dict(kwargs))
            outs[i] = (out[0] if isinstance(out, tuple) else out).detach()
        handles.append(block.register_forward_hook(hook, with_kwargs=True))
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in handles:
        h.remove()
    return calls, outs


def test_float_model_targets_are_the_float_models_hidden_states_whatever_the_inputs():
    model = tiny_llama()
    ids = torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(0))
    calls, outs = _calls(model, ids)
    tuner = finetune.BlockTuner(model)
    first = tuner._float_model_targets(model.model.layers[0], [(*calls[0], None)])
    assert torch.allclose(first[0][2], outs[0], atol=1e-5)
    args, kwargs = calls[1]
    noisy = (args[0] + 0.1 * torch.randn_like(args[0]), *args[1:]) if args else args
    kw = kwargs if args else {**kwargs, "hidden_states": kwargs["hidden_states"] + 0.1}
    second = tuner._float_model_targets(model.model.layers[1], [(noisy, kw, None)])
    assert torch.allclose(second[0][2], outs[1], atol=1e-5)  # the float trajectory, not the noisy input's
    assert second[0][0] is noisy  # the block is still run (and tuned) on the quantized model's input


def _tuned_block(seed):
    model = tiny_llama(layers=1)
    block, prefix = model.model.layers[0], "model.layers.0"
    batches = [torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(k)) for k in range(3)]
    calls = []
    for ids in batches:
        c, o = _calls(model, ids)
        calls.append((*c[0], o[0]))
    records = {}
    for name in ("mlp.up_proj", "mlp.down_proj"):
        lin = block.get_submodule(name)
        x = torch.randn(512, lin.in_features, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        records[f"{prefix}.{name}"] = quantize_e8_linear(lin.weight, x.T @ x / 512, 2, seed=1, fqn=f"{prefix}.{name}")
    before = {f: (r.scales.clone(), r.su.clone()) for f, r in records.items()}
    res = finetune.tune_block(block, prefix, records, {}, calls, seed=seed,
                              settings=finetune.FinetuneSettings(steps=10, lr=5e-3))
    return res, records, before


def test_tuning_lowers_the_block_error_keeps_codes_and_is_deterministic():
    res, records, before = _tuned_block(seed=3)
    assert res.kept and res.after < res.before
    for f, r in records.items():
        assert not torch.equal(r.scales, before[f][0]) and torch.equal(r.su.sign(), before[f][1].sign())
    again, records2, _ = _tuned_block(seed=3)
    assert (again.before, again.after) == (res.before, res.after)
    for f in records:
        assert torch.equal(records[f].scales, records2[f].scales) and torch.equal(records[f].su, records2[f].su)
