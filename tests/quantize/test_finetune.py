"""Block fine-tuning (quantize/finetune.py) on a tiny Llama: the float-model targets follow the float trajectory
whatever the quantized inputs are; quantizing a block group by group with tuning stages lowers its output error
against them, tunes the later groups' float weights on a copy, and is deterministic.
(lb.quantize with "w2-e8-ft" end to end: tests/test_e8_pipeline.py.)"""

import pytest
import torch
from tinymodels import tiny_llama

from lowbit_compile.calibrate import named_linears
from lowbit_compile.quantize import core, finetune
from lowbit_compile.quantize.records import E8QuantizedLinear
from lowbit_compile.recipe import Recipe

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
    tuner = finetune.BlockTuner(model, Recipe.parse("w2-e8-ft"))
    first = tuner._float_model_targets(model.model.layers[0], [(*calls[0], None)])
    assert torch.allclose(first[0][2], outs[0], atol=1e-5)
    args, kwargs = calls[1]
    noisy = (args[0] + 0.1 * torch.randn_like(args[0]), *args[1:]) if args else args
    kw = kwargs if args else {**kwargs, "hidden_states": kwargs["hidden_states"] + 0.1}
    second = tuner._float_model_targets(model.model.layers[1], [(noisy, kw, None)])
    assert torch.allclose(second[0][2], outs[1], atol=1e-5)  # the float trajectory, not the noisy input's
    assert second[0][0] is noisy  # the block is still run (and tuned) on the quantized model's input


def _tuned_block(seed, weights=True):
    """quantize_block on a one-block Llama: (rows, records, the finetune entry, the block's weights before, after)."""
    model = tiny_llama(layers=1)
    block, prefix = model.model.layers[0], "model.layers.0"
    recipe = Recipe.parse("w2-e8-ft", seed=seed)
    tuner = finetune.BlockTuner(model, recipe, settings=finetune.FinetuneSettings(steps=10, lr=5e-3, weights=weights))
    batches = [torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(k)) for k in range(3)]
    for ids in batches:
        c, o = _calls(model, ids)
        tuner.calls.setdefault(prefix, []).append((*c[0], o[0]))
    linears = named_linears(block, prefix)
    stats = finetune._block_stats(block, linears, tuner.calls[prefix])
    weights_before = {f: lin.weight.detach().clone() for f, lin in linears.items()}

    def quantize(members, st):
        rows = core.quantize_linears([core.Layer(f, lin.weight, st.get(f), st[f].owner) for f, lin in members.items()],
                                     recipe)
        return rows, {r.fqn: r.record.dequantized_weight() for r in rows}

    rows, deq, used, entries = tuner.quantize_block(linears, stats, quantize)
    records = {r.fqn: r.record for r in rows}
    assert all(torch.equal(deq[f], r.dequantized_weight()) for f, r in records.items())  # what the next block sees
    assert set(used) == set(linears) and set(entries) == set(linears)
    return records, entries[f"{prefix}.self_attn.q_proj"]["finetune"], weights_before, linears


def test_tuning_lowers_the_block_error_keeps_codes_and_is_deterministic():
    records, entry, weights_before, linears = _tuned_block(seed=3)
    assert all(isinstance(r, E8QuantizedLinear) for r in records.values()) and len(records) == 7
    assert [len(s["layers"]) for s in entry["stages"]] == [3, 1, 2, 1]  # q/k/v, o, gate/up, down
    assert entry["kept"] and all(s["error_after"] <= s["error_before"] for s in entry["stages"])
    assert entry["stages"][0]["error_after"] < entry["stages"][0]["error_before"]
    # the user's weights are untouched (the later groups were tuned on a copy)
    assert all(torch.equal(lin.weight, weights_before[f]) for f, lin in linears.items())
    again, entry2, _, _ = _tuned_block(seed=3)
    assert entry2 == entry
    for f in records:
        assert torch.equal(records[f].qweight, again[f].qweight) and torch.equal(records[f].scales, again[f].scales)
        assert torch.equal(records[f].su, again[f].su)


def test_later_groups_are_quantized_from_tuned_weights():
    tuned, *_ = _tuned_block(seed=3)
    fixed, *_ = _tuned_block(seed=3, weights=False)  # only the records' continuous parameters
    q, down = "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"
    assert torch.equal(tuned[q].qweight, fixed[q].qweight)  # the first group: same weight, same Hessian
    assert not torch.equal(tuned[down].qweight, fixed[down].qweight)
