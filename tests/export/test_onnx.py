"""ONNX export (export/onnx.py, export/onnx_ops.py): onnxruntime runs the exported low-bit models and matches the
PyTorch quantized model (nn.swap_linears) at other batch and sequence sizes; each route uses the intended ops;
the file keeps the packed low-bit bytes. Small shapes throughout; one real MiniLM export at full depth."""

import collections
import copy
import dataclasses
import importlib
import math
import os

import onnx
import pytest
import torch
from tinymodels import minilm, tiny_llama

import lowbit_compile  # noqa: F401  (registers the ops)
import lowbit_compile as lb
from lowbit_compile import Checkpoint, LayerSpec
from lowbit_compile.errors import LowbitError
from lowbit_compile.export import export
from lowbit_compile.export.onnx import choose_block, export_onnx, run_onnx, swap_for_onnx
from lowbit_compile.export.onnx_ops import act_thresholds
from lowbit_compile.formats import fp4 as f4
from lowbit_compile.nn import swap_linears
from lowbit_compile.quantize.layer import quantize_weight
from lowbit_compile.recipe import parse_spec

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

# FP4 specs with the max-scaled (unsearched) quantizer: the records have the searched recipes' structure (W4A16,
# W4A4 with a per-tensor activation scale, fp4-rot's rotation) at a fraction of the search's cost.
FP4_A16 = LayerSpec(bits=4, method="fp4", rotate=False, act_quant=False, fp4_search=False)
FP4_A4 = LayerSpec(bits=4, method="fp4", rotate=False, act_quant=True, fp4_search=False)
FP4_A4_ROT = LayerSpec(bits=4, method="fp4", rotate=True, act_quant=True, fp4_search=False, act_exponents=False)
WIDENED = "MatMulNBits (int{} widened to 4 bits in the graph)"


@pytest.fixture(scope="module", autouse=True)
def short_clip_search():
    """Three clipping fractions instead of seventeen: the export does not care how the scales were chosen, and the
    search is most of the quantization time of the real-MiniLM tests."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(importlib.import_module("lowbit_compile.quantize.rtn"), "CLIP_GRID", (0.5, 0.75, 1.0))
        yield


def _quantize(model, plan, seed=0):
    """{fqn: record} for every nn.Linear whose name contains a plan key (first match, else "*"): spec strings or
    LayerSpecs; FP4 layers get a random input sample."""
    g = torch.Generator().manual_seed(seed)
    recs = {}
    for fqn, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            spec = next((s for key, s in plan.items() if key in fqn), plan.get("*"))
            if spec is None:
                continue
            spec = parse_spec(spec) if isinstance(spec, str) else spec
            sample = torch.randn(32, mod.in_features, generator=g) if spec.method == "fp4" else None
            recs[fqn] = quantize_weight(fqn, mod.weight, spec, seed=seed, sample=sample)
    return recs


def _with_exponents(rec, seed=0, **kw):
    """An FP4 record with per-channel activation exponents k in {0, 1, 2} (as the fp4 recipe's search makes)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(0, 3, (rec.in_features,), generator=g).to(torch.uint8)
    return dataclasses.replace(rec, act_exponents=k, **kw)


def _ops(path):
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _input_names(path):
    return [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]


def _rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _reference(model, recs, *args, **kwargs):
    with torch.no_grad():
        out = swap_linears(model, recs).eval()(*args, **kwargs)
    return getattr(out, "logits", getattr(out, "last_hidden_state", out))


def test_choose_block():
    assert choose_block(192, 0) == 64
    assert choose_block(384, 0) == 128
    assert choose_block(344, 0) == 32  # no block divides 344: pad to 352
    assert choose_block(256, 64) == 64
    with pytest.raises(LowbitError):
        choose_block(200, 40)


@pytest.mark.parametrize("fmt", ["e2m1", "e1m2", "e3m0"])
def test_act_thresholds_round_like_the_reference(fmt):
    """magnitude[Σ_i [q > t_i]] (the graph's W4A4 activation rounding) equals formats.fp4.quantize bit for bit, ties
    (exact midpoints) and their float neighbours included."""
    t = torch.from_numpy(act_thresholds(fmt))
    mags = f4.fp4_format(fmt).magnitudes()
    mids = (mags[:-1] + mags[1:]) / 2
    q = torch.cat([mags, mids, torch.nextafter(mids, torch.tensor(0.0)), torch.nextafter(mids, torch.tensor(1e9)),
                   torch.rand(1000) * 1.2 * mags[-1], torch.tensor([float("inf")])])
    got = mags[(q[:, None] > t).sum(-1)]
    assert torch.equal(got, f4.quantize(q, f4.fp4_format(fmt), 1.0))


# One model of six linears covering 2/3/4/8 bits, per-row and grouped scales, rotated (192 = 12·16, 344 = 172·2,
# 100 and 20: Paley factors, the last two with no power-of-two part and sign vectors of a partial byte) and plain,
# K = 344 and K = 100 padded to whole blocks, K = 100 not a multiple of 8 3-bit codes.
DIMS = [192, 344, 160, 192, 128, 100, 20]
SPECS = ["w2", "w3", "w4-g32", "w8-rtn-g32", "w2-rtn-g64", "w3"]


@pytest.fixture(scope="module")
def six_linears():
    torch.manual_seed(0)
    lin = torch.nn.Sequential(*[torch.nn.Linear(DIMS[i], DIMS[i + 1]) for i in range(len(SPECS))]).eval()
    return lin, {str(i): quantize_weight(str(i), lin[i].weight, parse_spec(s)) for i, s in enumerate(SPECS)}


def test_opcheck(six_linears):
    """The lowbit_onnx:: ops are proper custom ops (schema, fake, no aliasing)."""
    from lowbit_compile.export.onnx_ops import pack_signs

    lin, recs = six_linears
    m = swap_for_onnx(lin, recs)
    x = torch.randn(2, 192)
    signs = pack_signs(recs["0"].su)
    torch.library.opcheck(torch.ops.lowbit_onnx.rotate, (x, signs, m[0].had_in, None))
    torch.library.opcheck(torch.ops.lowbit_onnx.int_matmul, (x, m[0].qweight, m[0].scales, 2, 192, 344, 0, 64, "nbits"))
    fp4 = _quantize(torch.nn.Sequential(torch.nn.Linear(192, 32)), {"*": FP4_A4})["0"]
    torch.library.opcheck(torch.ops.lowbit_onnx.fp4_matmul,
                          (x, fp4.qweight.reshape(32, -1, 1), fp4.w_scales, None, None, fp4.act_scale, 192, 32, "e2m1",
                           "e2m1"))


@pytest.mark.parametrize("options", [{}, {"standard_ops": True, "opset_version": 26, "external_data": True},
                                     {"native_nbits": True}], ids=["default", "standard-opset26-ext", "native-nbits"])
def test_integer_routes(tmp_path, six_linears, options):
    lin, recs = six_linears
    path = tmp_path / "m.onnx"
    res = export_onnx(lin, recs, (torch.randn(1, 3, 192),), path, **options)  # verified in onnxruntime
    x = torch.randn(3, 7, 192)  # another batch and sequence: dynamic axes
    ref = _reference(lin, recs, x)
    swap_options = {k: v for k, v in options.items() if k in ("standard_ops", "native_nbits")}
    assert _rel_err(swap_for_onnx(lin, recs, **swap_options)(x), ref) < 1e-5  # the ops' torch implementations
    assert _rel_err(run_onnx(path, {_input_names(path)[0]: x}), ref) < 1e-5
    m = onnx.load(str(path))
    ops, inits = _ops(path), {t.name: t for t in m.graph.initializer}
    for i in (0, 1, 4, 5):  # 2/3-bit layers keep the record's packed bytes
        assert len(inits[f"{i}.qweight"].raw_data) == recs[str(i)].qweight.numel()
    nbits = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    bits = sorted(next(a.i for a in n.attribute if a.name == "bits") for n in nbits)
    if options.get("standard_ops"):
        assert {o.domain for o in m.opset_import} == {""} and m.opset_import[0].version == 26
        assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"] and res.nbytes > path.stat().st_size
        assert ops["DequantizeLinear"] == 6 and not nbits
        assert set(res.routes.values()) == {"DequantizeLinear+MatMul"}
        assert inits["2.qweight"].data_type == onnx.TensorProto.INT4 and list(inits["2.qweight"].dims) == [160, 192]
        assert inits["3.qweight"].data_type == onnx.TensorProto.INT8
    elif options.get("native_nbits"):
        assert bits == [2, 2, 4, 4, 4, 8] and "DequantizeLinear" not in ops
        assert res.routes["0"] == "MatMulNBits 2-bit + zero-point correction"
    else:
        assert bits == [4, 4, 4, 4, 4] and "DequantizeLinear" not in ops
        assert res.routes == {"0": WIDENED.format(2), "1": WIDENED.format(3), "2": "MatMulNBits",
                                 "3": "int8 dequantized at load + MatMul", "4": WIDENED.format(2),
                                 "5": WIDENED.format(3)}
        assert inits["3.qweight"].data_type == onnx.TensorProto.INT8  # 8 bits in the file


def test_fp4_w4a16_and_w4a4(tmp_path):
    """W4A16 with exponents folded into the weight, W4A4 rotated (fp4-rot), W4A4 with a run-time shift and E1M2 /
    E3M0 activations: the activation rounding in the graph is bit-exact, so the outputs match to float32."""
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(192, 96), torch.nn.Linear(96, 160), torch.nn.Linear(160, 64),
                              torch.nn.Linear(64, 48)).eval()
    recs = _quantize(lin, {"0": FP4_A16, "1": FP4_A4_ROT, "2": FP4_A4, "3": FP4_A4})
    recs["0"] = _with_exponents(recs["0"])
    recs["2"] = _with_exponents(recs["2"], a_format="e1m2")
    recs["3"] = dataclasses.replace(recs["3"], w_format="e1m2", a_format="e3m0")
    path = tmp_path / "fp4.onnx"
    res = export_onnx(lin, recs, (torch.randn(1, 2, 192),), path)
    assert res.routes == {"0": "FP4 table+MatMul", "1": "FP4 table+MatMul, e2m1 activations",
                             "2": "FP4 table+MatMul, e1m2 activations", "3": "FP4 table+MatMul, e3m0 activations"}
    ops = _ops(path)
    assert ops["Greater"] == 3 and ops["Gather"] >= 4 and "MatMulNBits" not in ops
    assert {o.domain for o in onnx.load(str(path)).opset_import} == {""}
    x = torch.randn(3, 4, 192)
    ref = _reference(lin, recs, x)
    assert _rel_err(swap_for_onnx(lin, recs)(x), ref) < 1e-6
    assert _rel_err(run_onnx(path, {_input_names(path)[0]: x}), ref) < 1e-5


# Uniform 4-bit and FP4 plus a mixed plan holding 2/3/4/8 bits and FP4 side by side: each Llama export costs
# seconds of torch.export, so 2 and 3 bits uniform are exported on MiniLM instead.
LLAMA_PLANS = {
    "w4": {"*": "w4"},
    "fp4": {"lm_head": FP4_A16, "mlp": FP4_A4, "*": FP4_A4_ROT},
    "mixed": {"q_proj": "w2", "k_proj": "w3", "v_proj": "w4-g64", "o_proj": "w8", "gate_proj": "w2-g64",
              "up_proj": FP4_A4_ROT, "down_proj": "w3-rtn", "lm_head": FP4_A16},
}


@pytest.mark.drift
@pytest.mark.parametrize("plan", list(LLAMA_PLANS))
def test_tiny_llama(tmp_path, plan):
    model = tiny_llama(layers=1)
    model.config.use_cache = False
    recs = _quantize(model, LLAMA_PLANS[plan])
    assert len(recs) == 8
    if plan == "fp4":
        recs["model.layers.0.mlp.down_proj"] = _with_exponents(recs["model.layers.0.mlp.down_proj"])
    ckpt = Checkpoint(records=recs, recipe=plan)
    path = tmp_path / "llama.onnx"
    res = export(model, ckpt, (torch.randint(0, 320, (1, 8)),), path)  # the dispatcher: .onnx → export_onnx
    assert res.max_abs_error is not None
    ids = torch.randint(0, 320, (2, 5))
    assert _rel_err(run_onnx(path, {_input_names(path)[0]: ids}), _reference(model, recs, ids)) < 1e-4
    n_nbits = sum(r.fmt in ("int2", "int3", "int4") for r in recs.values())
    assert _ops(path)["MatMulNBits"] == n_nbits


def test_bad_options(tmp_path, six_linears):
    lin, recs = six_linears
    with pytest.raises(LowbitError, match="opset 20"):
        export_onnx(lin, recs, (torch.randn(1, 3, 192),), tmp_path / "m.onnx", opset_version=20)


def test_verification_catches_mismatch(tmp_path, monkeypatch):
    from lowbit_compile.export import onnx as ox

    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(64, 32))
    recs = _quantize(lin, {"*": "w4-rtn"})
    recs["0"].scales[0, 0] *= 2  # the torch reference uses the record ...
    orig = ox.swap_for_onnx

    def broken(*args, **kwargs):  # ... the exported graph a different scale
        m = orig(*args, **kwargs)
        m[0].scales[0, 0] *= 3
        return m

    monkeypatch.setattr(ox, "swap_for_onnx", broken)
    with pytest.raises(LowbitError, match="verification failed.*nothing was written"):
        export_onnx(lin, recs, (torch.randn(1, 2, 64),), tmp_path / "bad.onnx")
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- the real all-MiniLM-L6-v2


@pytest.fixture(scope="module")
def real_minilm():
    model, tok = minilm()
    enc = tok(["a tiny sentence", "another, slightly longer sentence here"], return_tensors="pt", padding=True)
    other = tok(["one more", "and the last of three sentences, the longest one", "x"], return_tensors="pt",
                padding=True)
    pick = ("input_ids", "attention_mask")
    return model, {k: enc[k] for k in pick}, {k: other[k] for k in pick}


def _check_minilm(model, recs, inputs, other, path, **options):
    res = export_onnx(model, recs, inputs, path, **options)
    got = run_onnx(path, other)
    assert _rel_err(got, _reference(model, recs, **other)) < 1e-4
    return res


@pytest.mark.drift
@pytest.mark.slow
def test_minilm_2bit(tmp_path, real_minilm):
    """The whole real model at w2 (randomized Hadamard on every linear: K = 384 = 12·32, 1536 = 12·128): file bytes
    per quantized weight within 0.3 bits of the recipe's. Charged to the quantized weights: everything in the file
    except the float tensors the recipe does not count either (embeddings, norms, biases), i.e. packed codes,
    scales, signs, Hadamard factors and the whole graph, attention included."""
    model, inputs, other = real_minilm
    recs = _quantize(model, {"*": "w2"})
    assert len(recs) == 37
    path = tmp_path / "minilm.onnx"
    res = _check_minilm(model, recs, inputs, other, path)
    assert set(res.routes.values()) == {WIDENED.format(2)}
    m = onnx.load(str(path))
    quant = tuple(f + "." for f in recs)
    other_bytes = sum(len(t.raw_data) for t in m.graph.initializer
                      if not t.name.startswith(quant) or t.name.endswith(".bias"))
    n_weights = sum(r.in_features * r.out_features for r in recs.values())
    file_bits = 8 * (res.nbytes - other_bytes) / n_weights
    recipe_bits = sum(r.bits_per_weight() * r.in_features * r.out_features for r in recs.values()) / n_weights
    assert abs(file_bits - recipe_bits) < 0.3, (file_bits, recipe_bits)
    assert res.nbytes < 1.1 * other_bytes + n_weights  # nothing was folded back to float


MINILM_MIXED = {"attention.self.query": "w3", "attention.self.key": "w2-g64", "attention.self.value": FP4_A4_ROT,
                "attention.output": "w4-g128", "intermediate": FP4_A16, "output.dense": "w3-rtn", "pooler": None}


@pytest.mark.slow
@pytest.mark.parametrize("plan", ["w3-standard", "mixed"])
def test_minilm_first_layer(tmp_path, real_minilm, plan):
    """The real weights, truncated to the first layer: 3 bits through standard ops only, and a mixed plan (2/3/4 bits,
    FP4 W4A16 and rotated W4A4, grouped scales, a float layer)."""
    model, inputs, other = real_minilm
    model = copy.deepcopy(model)
    model.encoder.layer = model.encoder.layer[:1]
    recs = _quantize(model, {"*": "w3"} if plan == "w3-standard" else MINILM_MIXED)
    res = _check_minilm(model, recs, inputs, other, tmp_path / "minilm2.onnx", standard_ops=plan == "w3-standard")
    if plan == "w3-standard":
        assert len(recs) == 7 and set(res.routes.values()) == {"DequantizeLinear+MatMul"}
        assert "MatMulNBits" not in _ops(tmp_path / "minilm2.onnx")
    else:
        assert len(recs) == 6 and "pooler.dense" not in res.routes
        assert {r.fmt for r in recs.values()} == {"int2", "int3", "int4", "fp4 w:e2m1 a:float",
                                                  "fp4 w:e2m1 a:e2m1 rot"}


def test_a_quantized_tied_embedding_exports_as_a_gather_of_the_packed_table(tmp_path):
    """The embedding's rows are gathered from its packed codes in standard ops (export/embedding.py) and the tied
    head runs the same record: no float table of vocabulary x hidden is left in the file."""
    from lowbit_compile.export.embedding import GatherEmbedding
    from lowbit_compile.nn import LowbitEmbedding

    model = tiny_llama(tie=True, layers=1)
    model.config.use_cache = False
    ck = lb.quantize(model, "w4", None, overrides={"model.embed_tokens": "w4-rtn-g32"}, progress=False)
    rec = ck.records["model.embed_tokens"]
    ids = torch.randint(0, 320, (2, 9))
    assert torch.equal(GatherEmbedding(rec)(ids), LowbitEmbedding(rec)(ids))  # bit for bit
    path = tmp_path / "tied.onnx"
    res = export(model, ck, (ids,), path)
    assert res.max_abs_error is not None
    m = onnx.load(str(path))
    floats = [t for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and list(t.dims) == [320, 192]]
    assert floats == []
    tables = [t for t in m.graph.initializer if t.data_type == onnx.TensorProto.UINT8
              and math.prod(t.dims) == 320 * 192 // 2]
    assert len(tables) == 1  # the gather and the head's MatMulNBits read one packed table
    other = torch.randint(0, 320, (3, 5))
    assert _rel_err(run_onnx(path, {_input_names(path)[0]: other}), _reference(model, ck.records, other)) < 1e-4


# ----------------------------------------------------------------------------- E8 lattice codes

E8_DIMS = (40, 24, 56)  # multiples of 8, rotated through Paley factors (20·2, 12·2, 28·2); K = 40 and 24 padded


def _e8_mlp(bits):
    from tinymodels import e8_records

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 24), torch.nn.GELU(), torch.nn.Linear(24, 56)).eval()
    # layer 2: su / sv as -ft recipes leave them; layer 0: its own bias, as bias correction leaves it
    return model, e8_records(model, bits, tuned=("2",), biased=("0",))


@pytest.mark.parametrize("standard_ops", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_e8_records_export_to_onnx_with_their_codes_and_match(bits, standard_ops, tmp_path):
    """E8 records (one of them with fine-tuned sign vectors): the file holds the code bytes (bits/8 bytes per
    weight), no float weight; onnxruntime matches the PyTorch quantized model to float rounding (measured ≤ 1e-6) at
    another batch size. Default route: one 4-bit MatMulNBits per E8 stage, the decode folded when the session is
    created (no Gather left, every B and zero point an initializer); standard_ops: a MatMul on the decoded weight."""
    import onnxruntime as ort

    from lowbit_compile.export.onnx import exact_session_options

    model, recs = _e8_mlp(bits)
    res = export_onnx(model, recs, (torch.randn(2, 40),), tmp_path / "e8.onnx", standard_ops=standard_ops)
    assert res.error <= 1e-5
    stages = 1 if bits == 2 else 2
    x = torch.randn(5, 40)
    got = run_onnx(res.path, {_input_names(res.path)[0]: x})
    assert _rel_err(got, _reference(model, recs, x)) <= 1e-5
    m = onnx.load(str(res.path))
    inits = {t.name: t for t in m.graph.initializer}
    codes = [t for n, t in inits.items() if n.endswith("qweight")]
    assert sorted(math.prod(t.dims) for t in codes) == sorted(r.qweight.numel() for r in recs.values())
    assert all(t.data_type == onnx.TensorProto.UINT8 for t in codes)
    assert not any(t.data_type == onnx.TensorProto.FLOAT and math.prod(t.dims) >= 24 * 40 for t in inits.values())
    ops = _ops(res.path)
    if standard_ops:
        assert "MatMulNBits" not in ops and all(o.domain in ("", "ai.onnx") for o in m.opset_import)
        assert set(res.routes.values()) == {f"E8 e8p{bits} decoded at load + MatMul"}
        return
    assert ops["MatMulNBits"] == 2 * stages
    so = exact_session_options()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(res.path), so, providers=["CPUExecutionProvider"])
    opt = onnx.load(so.optimized_model_filepath)
    folded = {t.name for t in opt.graph.initializer}
    nbits = [n for n in opt.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 2 * stages and all(n.input[1] in folded and n.input[3] in folded for n in nbits)
    assert not {"Gather", "BitShift", "Pad"} & {n.op_type for n in opt.graph.node}


def test_e8_llama_exports_to_onnx_at_two_bits_per_weight(tmp_path):
    """w2-e8 on every linear of a 1-layer tiny Llama but the head: onnxruntime matches the PyTorch quantized model
    (measured 5e-7) at other batch and sequence sizes; the E8 layers' initializers cost 2.20 bits per weight: codes
    2, float16 row scales 0.07, sign bits 0.01, the 4.3 KB digit tables (once per file) 0.11 on this small model
    (the rotations' Hadamard factors, shared by every rotated layer of a size, aside)."""
    from tinymodels import e8_records

    model = tiny_llama(layers=1)
    model.config.use_cache = False
    recs = e8_records(model, 2)
    res = export_onnx(model, recs, (torch.randint(0, 320, (1, 7)),), tmp_path / "llama.onnx")
    assert res.error <= 1e-5 and len(res.routes) == 7
    for shape in [(2, 5), (1, 12)]:
        ids = torch.randint(0, 320, shape)
        got = run_onnx(res.path, {_input_names(res.path)[0]: ids})
        assert _rel_err(got, _reference(model, recs, ids)) <= 1e-5
    m = onnx.load(str(res.path))
    layer = ("qweight", "scales", "su", "sv", "magnitudes", "signs", "offsets")
    weight_bytes = sum(onnx.numpy_helper.to_array(t).nbytes for t in m.graph.initializer
                       if t.name.rsplit(".", 1)[-1] in layer)
    n = sum(r.in_features * r.out_features for r in recs.values())
    assert 2 < 8 * weight_bytes / n <= 2.25
