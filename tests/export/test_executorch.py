"""ExecuTorch export of HF models: .pte files that hold the packed low-bit weights and run in executorch.runtime.
Plain modules and the export's errors: test_executorch_modules.py; E8 records: test_executorch_e8.py.

Exports are slow (ExecuTorch lowers op by op in Python, ~1 s per XNNPACK partition), so this file budgets
them: every export is a module-scoped fixture or one test, and its several checks share it. The HF models are
kept small: a 1-layer tiny Llama (hidden 192 and MLP 344: Paley rotations, sign-bit blocks), the real MiniLM
with its first encoder layer (as examples/export_executorch.py does in the suite); bench/export_size.py exports and
checks the full models at every bit width, bench/pte_latency.py times them.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("executorch")
pytest.importorskip("torchao")

from pte_support import (  # noqa: E402
    LLAMA_MIXED,
    MINILM_MIXED,
    SHIFT_OP,
    TABLE_OP,
    check_file,
    expected_route,
    quantize_all,
    reference_outputs,
)
from tinymodels import minilm, tiny_llama  # noqa: E402

import lowbit_compile as lb  # noqa: E402
from lowbit_compile.export import export  # noqa: E402
from lowbit_compile.export.executorch import (  # noqa: E402
    RTOL_FLOAT,
    RTOL_INT8_ACTIVATIONS,
    WEIGHTS_METHOD,
    export_pte,
    load_pte_method,
    max_rel_error,
    run_pte,
)
from lowbit_compile.nn import swap_linears  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- HF models end to end


@pytest.fixture(scope="module")
def llama_mixed(tmp_path_factory):
    """The mixed plan (int4 on XNNPACK per channel and in groups, packed 2 and 3 bits: down_proj's 344 inputs at 3
    bits), with dynamic batch and sequence (max_batch 4, max_seq 32)."""
    model = tiny_llama(layers=1)
    records = quantize_all(model, LLAMA_MIXED)
    inputs = (torch.randint(0, 320, (2, 12)),)
    res = export_pte(model, records, inputs, tmp_path_factory.mktemp("mixed") / "llama.pte", max_batch=4,
                     max_seq=32)
    return model, records, inputs, res


@pytest.mark.drift
def test_llama_mixed_pte_matches(llama_mixed):
    model, records, inputs, res = llama_mixed
    assert res.routes == {k: expected_route(r) for k, r in records.items()}
    assert set(res.routes.values()) == {"xnnpack-int4", "packed"}
    assert {r.bits for r in records.values()} == {2, 3, 4}
    assert res.portable_ops.get(SHIFT_OP, 0) > 0 and not any(op.startswith("lowbit") for op in res.portable_ops)
    assert res.error <= res.rtol and res.error_vs_simulated < 0.02
    check_file(res, model, records, inputs)


def test_dynamic_batch_and_sequence(llama_mixed):
    model, records, _, res = llama_mixed
    assert any(d.startswith("input_ids.0") for d in res.dynamic_dims)
    assert any(d.startswith("input_ids.1") for d in res.dynamic_dims)
    for shape in [(3, 7), (4, 32), (1, 5)]:  # size 1 runs too, though torch.export reports ranges from 2
        ids = torch.randint(0, 320, shape)
        ys = run_pte(res.path, (ids,))
        assert ys[0].shape == (*shape, 320)
        assert max_rel_error(ys, reference_outputs(model, records, (ids,))) <= RTOL_INT8_ACTIVATIONS


@pytest.fixture(scope="module")
def llama_fp4(llama_fp4_checkpoint, tmp_path_factory):
    """The FP4 checkpoint exported with static shapes (batch and sequence dynamic on FP4 layers:
    test_pte_bits_per_quantized_weight[fp4])."""
    model, ck = llama_fp4_checkpoint
    inputs = (torch.randint(0, 320, (2, 12)),)
    return model, ck, inputs, export_pte(model, ck, inputs, tmp_path_factory.mktemp("fp4") / "llama.pte",
                                         dynamic_shapes=None)


def test_llama_fp4_pte_runs_and_matches(llama_fp4):
    """fp4 (W4A4 + per-channel exponents), fp4-rot and w4a16-fp4 layers from lb.quantize, in one program: codes
    unpacked with shifts, decoded by table lookup, activations rounded in the graph; float rounding only."""
    model, ck, inputs, res = llama_fp4
    recs = ck.records
    assert res.routes == {k: expected_route(r) for k, r in recs.items()}
    assert set(res.routes.values()) == {"fp4-a4", "fp4-a16"}
    assert any(r.act_exponents is not None for r in recs.values()) and any(r.su is not None for r in recs.values())
    assert res.portable_ops.get(SHIFT_OP, 0) > 0 and res.portable_ops.get(TABLE_OP, 0) > 0
    assert not any(op.startswith("lowbit") for op in res.portable_ops)
    assert res.rtol == RTOL_FLOAT and (res.error <= res.rtol or res.rounding_flips)
    check_file(res, model, recs, inputs)


@pytest.fixture(scope="module")
def minilm_inputs():
    model, tok = minilm()
    enc = tok(["Low-bit weights run in the ExecuTorch runtime.", "a second, shorter sentence"],
              padding=True, return_tensors="pt")
    return model, (enc["input_ids"], enc["attention_mask"])


def test_minilm_first_layer_mixed_pte_matches(minilm_inputs, tmp_path):
    """The real MiniLM with its first encoder layer, every route of the integer exporter: XNNPACK int4 in
    groups of 32 and per channel, packed 3 and 2 bits."""
    model, inputs = minilm_inputs
    model = copy.deepcopy(model)
    model.encoder.layer = model.encoder.layer[:1]
    records = quantize_all(model, MINILM_MIXED)
    res = export_pte(model, records, inputs, tmp_path / "minilm.pte", dynamic_shapes=None)
    assert set(res.routes.values()) == {"xnnpack-int4", "packed"} and {r.bits for r in records.values()} == {2, 3, 4}
    assert {(r.bits, r.group_size) for r in records.values()} == {(4, 32), (3, 0), (2, 0), (4, 0)}
    ys = check_file(res, model, records, inputs)
    assert len(ys) == 2 and ys[0].shape == (2, inputs[0].shape[1], 384)  # last hidden state, pooled output


# ----------------------------------------------------------------------------- 2/3-bit codes widened at load


@pytest.fixture(scope="module")
def llama_load(tmp_path_factory):
    """The tiny Llama at 3 bits (attention) and 2 bits (MLP) with int4="xnnpack-load", static shapes (a dynamic
    batch on this route: test_odd_widths_run_on_the_channelwise_int4_kernel): every layer widened at load, down_proj
    too (344 inputs, no multiple of 32: per channel, on XNNPACK's channelwise kernel)."""
    model = tiny_llama(layers=1)
    records = quantize_all(model, [(r".*\.(q|k|v|o)_proj", "w3"), (r".*", "w2")])
    inputs = (torch.randint(0, 320, (2, 12)),)
    res = export_pte(model, records, inputs, tmp_path_factory.mktemp("load") / "llama.pte", int4="xnnpack-load",
                     dynamic_shapes=None)
    return model, records, inputs, res


def test_llama_load_time_weights_pte_matches(llama_load):
    """XNNPACK's int4 kernel on 2/3-bit codes widened at load: int8 activations, so the int8 tolerance; the
    widening itself is exact (the simulated model, the same int4 weights in PyTorch, is a fraction of a percent
    away)."""
    model, records, inputs, res = llama_load
    assert res.routes == {k: expected_route(r, "xnnpack-load") for k, r in records.items()}
    assert set(res.routes.values()) == {"xnnpack-int4-load"} and {r.bits for r in records.values()} == {2, 3}
    assert res.weights_method == WEIGHTS_METHOD and res.weights_method_ops.get(SHIFT_OP, 0) > 0
    assert res.rtol == RTOL_INT8_ACTIVATIONS and res.error <= res.rtol and res.error_vs_simulated < 0.02
    check_file(res, model, records, inputs)


def test_load_time_weights_are_not_in_the_file(llama_load):
    """The widened weights are not in the file: a plain load of forward fails, load_pte_method runs the weights
    method first and hands its outputs to forward."""
    from executorch.runtime import Runtime

    _, _, inputs, res = llama_load
    program = Runtime.get().load_program(res.path)
    assert program.method_names == {"forward", WEIGHTS_METHOD}
    with pytest.raises(RuntimeError, match="forward"):
        program.load_method("forward")
    assert load_pte_method(res.path).execute(list(inputs))[0].shape == (2, 12, 320)


def test_minilm_first_layer_load_time_weights_pte_matches(minilm_inputs, tmp_path):
    """The real MiniLM with its first encoder layer at 2 bits per channel and 3 bits in groups of 32, every layer
    widened at load."""
    model, inputs = minilm_inputs
    model = copy.deepcopy(model)
    model.encoder.layer = model.encoder.layer[:1]
    records = quantize_all(model, [(r".*\.attention\..*", "w3-g32"), (r".*", "w2")])
    res = export_pte(model, records, inputs, tmp_path / "minilm.pte", dynamic_shapes=None, int4="xnnpack-load")
    assert set(res.routes.values()) == {"xnnpack-int4-load"}
    assert {(r.bits, r.group_size) for r in records.values()} == {(3, 32), (2, 0)}
    assert res.error <= res.rtol == RTOL_INT8_ACTIVATIONS
    check_file(res, model, records, inputs)


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory):
    """The tiny Llama with its embedding tied to the head, blocks at w4 and the embedding (so the head) at
    w4-rtn-g32, exported with the default int4="xnnpack" and static shapes (both programs of the tied tests are
    static, so that they compare bit for bit; dynamic shapes of the Llama graph: llama_mixed)."""
    model = tiny_llama(tie=True, layers=1)
    model.config.use_cache = False
    ck = lb.quantize(model, "w4", None, overrides={"model.embed_tokens": "w4-rtn-g32"}, progress=False)
    ids = torch.randint(0, 320, (2, 9))
    res = export(model, ck, (ids,), tmp_path_factory.mktemp("tied") / "tied.pte", dynamic_shapes=None)
    return model, ck, ids, res


def _table_copies(path, rec) -> tuple[int, int]:
    """How often the record's packed codes and its scales (as bfloat16, XNNPACK's form) appear in the file."""
    data = path.read_bytes()
    bf16 = rec.scales.to(torch.float32).to(torch.bfloat16).contiguous().view(torch.uint8).numpy().tobytes()
    return data.count(rec.qweight.contiguous().numpy().tobytes()), data.count(bf16)


def test_a_quantized_tied_embedding_exports_to_pte_as_a_gather_of_the_packed_table(tied_llama, tmp_path):
    """The embedding's packed rows are gathered and decoded in portable integer ops (route "gather", the same
    module as the ONNX export) and the tied head runs the shared record: the program matches the PyTorch quantized
    model and holds no float vocabulary × hidden table. With int4="xnnpack" the head's weight is XNNPACK's own copy
    of the table (a delegate's data cannot be read by the gather outside it): the codes are in the file twice."""
    from lowbit_compile.export.embedding import GatherEmbedding
    from lowbit_compile.nn import LowbitEmbedding

    model, ck, ids, res = tied_llama
    emb = LowbitEmbedding(ck.records["model.embed_tokens"])
    assert torch.equal(GatherEmbedding(emb)(ids), emb(ids))  # the decomposition is exact
    assert res.routes["model.embed_tokens"] == "gather" and res.routes["lm_head"] == "xnnpack-int4"
    assert res.error <= res.rtol
    assert res.error_vs_simulated < 1e-5  # int8 activations of the int4 layers aside, the program is exact
    rec = ck.records["model.embed_tokens"]
    assert _table_copies(res.path, rec) == (2, 1)
    data = res.path.read_bytes()  # no float copy of the table: neither the model's rows nor the decoded ones
    for table in (model.model.embed_tokens.weight, rec.dequantized_weight()):
        rows = table.detach().to(torch.float32)[[0, 17, 319]].contiguous().numpy()
        assert not any(row.tobytes() in data for row in rows)
    other = torch.randint(0, 320, ids.shape)
    with torch.no_grad():
        ref = swap_linears(model, ck.records)(other).logits
    got = run_pte(res.path, [other])[0]
    assert float((got - ref).abs().max()) <= res.rtol * float(ref.abs().max())  # the int8-activation tolerance


def test_a_tied_head_rebuilt_at_load_stores_the_table_once(tied_llama, tmp_path):
    """int4="xnnpack-load": the head's XNNPACK weight is left out of the file and rebuilt at load from the gather's
    table (route xnnpack-int4-load; for 4-bit codes, the table's bytes as they are): the packed codes appear in the
    file once, the file is smaller by XNNPACK's copy (codes and bfloat16 scales), and the head runs the same kernel
    on the same bytes, so the outputs equal the int4="xnnpack" program's bit for bit and match the PyTorch quantized
    model at the int8-activation tolerance, on other token ids too."""
    from executorch.runtime import Runtime

    model, ck, ids, both = tied_llama
    rec = ck.records["model.embed_tokens"]
    res = export(model, ck, (ids,), tmp_path / "tied-load.pte", int4="xnnpack-load", dynamic_shapes=None)
    assert res.routes == {**both.routes, "lm_head": "xnnpack-int4-load"}
    assert res.weights_method == WEIGHTS_METHOD and res.rtol == RTOL_INT8_ACTIVATIONS and res.error <= res.rtol
    assert _table_copies(res.path, rec) == (1, 0)  # the scales: the gather's float16 ones only
    xnnpack_copy = rec.qweight.numel() + 2 * rec.scales.numel()  # 4-bit codes and bfloat16 scales
    assert 0.9 * xnnpack_copy < both.nbytes - res.nbytes <= xnnpack_copy
    assert WEIGHTS_METHOD in Runtime.get().load_program(res.path).method_names
    check_file(res, model, ck.records, (ids,))
    for seed in (1, 2):
        other = torch.randint(0, 320, ids.shape, generator=torch.Generator().manual_seed(seed))
        got = run_pte(res.path, [other])
        assert torch.equal(got[0], run_pte(both.path, [other])[0])
        assert max_rel_error(got, reference_outputs(model, ck.records, (other,))) <= RTOL_INT8_ACTIVATIONS
