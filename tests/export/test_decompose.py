"""export/decompose.py: the runtime modules that replace the lowbit modules before capture (eager, fast: no
.pte is written here), their routes and the load-time weights method."""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("executorch")
pytest.importorskip("torchao")

from pte_support import (  # noqa: E402
    expected_route,
    quantize_all,
    short_fp4_search,
)

from lowbit_compile import hadamard  # noqa: E402
from lowbit_compile.errors import LowbitError  # noqa: E402
from lowbit_compile.export.decompose import (  # noqa: E402
    INT4_MODES,
    FP4TableLinear,
    Int4DynamicLinear,
    KronTransform,
    LoadTimeWeights,
    PackedLinear,
    decompose_lowbit_linears,
    int4_weight,
    kron_blocks,
    load_time_weights,
    route_for,
)
from lowbit_compile.export.executorch import (  # noqa: E402
    max_rel_error,
    weights_data,
)
from lowbit_compile.formats import fp4 as f4  # noqa: E402
from lowbit_compile.kernels.fp4_ops import quantize_fp4_activations  # noqa: E402
from lowbit_compile.nn import LowbitFP4Linear, LowbitLinear, swap_linears  # noqa: E402
from lowbit_compile.quantize.layer import quantize_fp4_group, quantize_weight  # noqa: E402
from lowbit_compile.recipe import parse_spec  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")




@pytest.mark.parametrize("n", [12, 64, 96, 192, 344, 1376, 4096])
def test_kron_transform_is_the_hadamard_transform(n):
    blocks = kron_blocks(n, hadamard.factor(n))
    assert all(b.shape[0] <= max(64, hadamard.plan(n).factor_size) for b in blocks)
    x = torch.randn(2, 3, n)
    ref = hadamard.apply(x, None, hadamard.factor(n))
    assert torch.allclose(KronTransform(blocks)(x), ref, atol=1e-5)
    assert torch.allclose(KronTransform(blocks, transpose=True)(ref), x, atol=1e-5)


def test_large_hadamard_factor_is_stored_as_sign_bits():
    kt = KronTransform(kron_blocks(1376, hadamard.factor(1376)))  # F_344 (Paley) ⊗ H_4
    buffers = dict(kt.named_buffers())
    assert buffers["block0_signs"].dtype == torch.uint8 and buffers["block0_signs"].numel() == 344 * 43
    assert torch.equal(kt.block(0), hadamard.factor(1376))  # rebuilt exactly


@pytest.mark.parametrize("recipe", ["w2", "w3", "w4", "w8", "w4-rtn", "w2-g32", "w3-rtn-g32", "w4-g64"])
@pytest.mark.parametrize("shape", [(96, 192), (344, 128), (40, 64)])
def test_runtime_modules_match_the_op(recipe, shape):
    torch.manual_seed(0)
    rec = quantize_weight("l", torch.randn(*shape), parse_spec(recipe), seed=1)
    lin = LowbitLinear(rec, torch.randn(shape[0]))
    x = torch.randn(2, 3, shape[1])
    with torch.no_grad():
        ref = lin(x)
        packed = PackedLinear(lin)
        assert torch.equal(packed.codes(), _unpacked(rec))
        assert torch.allclose(packed(x), ref, atol=1e-4, rtol=1e-5)  # exact up to float rounding
        if route_for(lin, "xnnpack-wide") == "xnnpack-int4":  # int8 activations: a fraction of a percent
            assert max_rel_error([Int4DynamicLinear(lin)(x)], [ref]) < 0.02


def _unpacked(rec):
    from lowbit_compile import formats

    return formats.unpack(rec.qweight, rec.bits, rec.in_features)


def test_routes():
    recs = {r: quantize_weight("l", torch.randn(64, k), parse_spec(r)) for r, k in
            [("w4", 192), ("w4-g32", 192), ("w2", 192), ("w3-g64", 192), ("w8", 192)]}
    # per channel, XNNPACK's channelwise kernel takes any even in_features: 344 (no multiple of 32), not 45 (odd)
    recs["w4-344"] = quantize_weight("l", torch.randn(64, 344), parse_spec("w4"))
    recs["w2-344"] = quantize_weight("l", torch.randn(64, 344), parse_spec("w2"))
    recs["w4-45"] = quantize_weight("l", torch.randn(64, 45), parse_spec("w4"))
    recs["w2-45"] = quantize_weight("l", torch.randn(64, 45), parse_spec("w2"))
    recs["w4-g16"] = quantize_weight("l", torch.randn(64, 192), parse_spec("w4-g16"))  # blocks must be 32·k
    routes = {k: route_for(LowbitLinear(r)) for k, r in recs.items()}
    assert routes == {"w4": "xnnpack-int4", "w4-g32": "xnnpack-int4", "w2": "packed", "w3-g64": "packed",
                      "w8": "packed", "w4-344": "xnnpack-int4", "w2-344": "packed", "w4-45": "packed",
                      "w2-45": "packed", "w4-g16": "packed"}
    load = {k: route_for(LowbitLinear(r), "xnnpack-load") for k, r in recs.items()}
    # widened at load when packed codes fill whole rows (in_features a multiple of 8)
    assert load == {**routes, "w2": "xnnpack-int4-load", "w3-g64": "xnnpack-int4-load",
                    "w2-344": "xnnpack-int4-load"}
    wide = {k: route_for(LowbitLinear(r), "xnnpack-wide") for k, r in recs.items()}
    assert wide == {**routes, "w2": "xnnpack-int4", "w3-g64": "xnnpack-int4", "w2-344": "xnnpack-int4"}
    assert {route_for(LowbitLinear(r), int4="packed") for r in recs.values()} == {"packed"}
    # a head whose codes are its embedding's table: rebuilt at load from that table with "xnnpack-load" only
    tied = {m: {k: route_for(LowbitLinear(r), m, tied=True) for k, r in recs.items()} for m in INT4_MODES}
    tied_load = {**load, "w4": "xnnpack-int4-load", "w4-g32": "xnnpack-int4-load", "w4-344": "xnnpack-int4-load"}
    assert tied == {"xnnpack": routes, "xnnpack-load": tied_load,
                    "xnnpack-wide": wide, "packed": {k: "packed" for k in recs}}
    with pytest.raises(LowbitError, match="valid choices.*xnnpack-load"):
        route_for(LowbitLinear(recs["w4"]), int4="int4")


@pytest.mark.parametrize("recipe", ["w2", "w3", "w4", "w2-g32", "w3-rtn-g64", "w4-g32"])
def test_int4_weight_is_the_records_weight(recipe):
    """2/3-bit codes as odd int4 values with half the scale: codes · scales is the record's (c − zero)·s exactly, with
    a grouped layer's s rounded to bfloat16 as XNNPACK's blockwise kernel stores it (per channel: float32, exact)."""
    from lowbit_compile import formats

    rec = quantize_weight("l", torch.randn(48, 128), parse_spec(recipe), seed=1)
    codes, scales = int4_weight(LowbitLinear(rec))
    assert codes.dtype == torch.int8 and -8 <= int(codes.min()) and int(codes.max()) <= 7
    c = formats.unpack(rec.qweight, rec.bits, 128).to(torch.float32) - formats.int_format(rec.bits).zero
    s = rec.scales.to(torch.float32).reshape(48, -1)
    if rec.group_size:
        s = s.to(torch.bfloat16).to(torch.float32)
    block = rec.group_size or 128
    expect = (c.view(48, -1, block) * s.unsqueeze(-1)).view(48, 128)
    assert torch.equal((codes.float().view(48, -1, block) * scales.unsqueeze(-1)).view(48, 128), expect)


@pytest.mark.parametrize("recipe", ["w2", "w3", "w2-g32", "w3-g64", "w4", "w4-rtn-g32"])
def test_load_time_weights_are_xnnpacks_bytes(recipe):
    """What the lowbit_weights method computes from the packed codes is bit for bit what ExecuTorch's XNNPACK
    serializer makes of the layer's int4 codes (NodeVisitor.convert_to_qc4w) and scales (float32 per channel,
    bfloat16 per group). 4-bit codes are the record's packed bytes as they are."""
    from executorch.backends.xnnpack.operators.node_visitor import NodeVisitor

    recs = [quantize_weight(f"l{i}", torch.randn(40 + 8 * i, 192), parse_spec(recipe), seed=i) for i in range(2)]
    mods = [Int4DynamicLinear(LowbitLinear(r), at_load=True) for r in recs]
    assert {m.route for m in mods} == {"xnnpack-int4-load"}
    with torch.no_grad():
        out = LoadTimeWeights(mods)()
    assert len(out) == 4
    for i, rec in enumerate(recs):
        codes, scales = int4_weight(LowbitLinear(rec))
        assert torch.equal(out[2 * i], NodeVisitor.convert_to_qc4w(codes))
        if rec.group_size:
            assert torch.equal(out[2 * i + 1], scales.to(torch.bfloat16))
        else:
            assert out[2 * i + 1].dtype == torch.float32 and torch.equal(out[2 * i + 1], scales.reshape(-1))
        if rec.bits == 4:
            assert torch.equal(out[2 * i], rec.qweight)
    keys = weights_data(out)
    assert len(keys) == 4 and sum(k.startswith("scale_") for k in keys) == 2


def _fp4_layer(recipe, out_features=24, in_features=45, seed=0):
    """An FP4 record of `recipe` from the real search (short grid), on a weight and input sample with outlier
    channels. 45 inputs: an odd packed length and, for fp4-rot, a random orthogonal rotation factor."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g)
    x = torch.randn(64, in_features, generator=g)
    x[:, 3] *= 20
    with short_fp4_search():
        rec = quantize_fp4_group({"l": (w, parse_spec(recipe))}, x, seed=seed)["l"]
    return rec, x


@pytest.mark.parametrize("a_format", ["e2m1", "e1m2", "e3m0"])
def test_fp4_activation_rounding_is_the_reference_bit_for_bit(a_format):
    """The graph's rounding (midpoints counted with sub/clamp/ceil) against the reference (float bit fields):
    grid points, midpoints (ties to the even code), their float neighbours, saturation, Inf, zeros, random
    values, with per-channel exponents; at a tiny, a middling and a large scale."""
    rec, _ = _fp4_layer("fp4")
    fmt = f4.fp4_format(a_format)
    g = fmt.magnitudes()
    mids = (g[:-1] + g[1:]) / 2
    special = torch.cat([g, mids, torch.nextafter(mids, torch.tensor(0.0)), torch.nextafter(mids, torch.tensor(99.0)),
                         torch.linspace(0, 2 * float(g[-1]), 4001), torch.tensor([1e30, float("inf"), 0.0])])
    for scale in (2.0**-20, 0.37109375, 1000.0):
        rec.a_format, rec.act_scale = a_format, torch.tensor([scale], dtype=torch.float16)
        rec.act_exponents = torch.randint(0, fmt.max_exponent_shift + 1, (45,), dtype=torch.uint8)
        lin = LowbitFP4Linear(rec)
        s = float(rec.act_scale)
        x = torch.cat([special, -special, torch.randn(9000) * float(g[-1])]) * s
        x = torch.cat([x, torch.zeros(-x.numel() % 45)]).view(-1, 45) / f4.exponent_multipliers(rec.act_exponents)
        ours = FP4TableLinear(lin).quantize_activations(x)
        ref = quantize_fp4_activations(x, lin.act_shift, lin.act_scale, a_format)
        assert torch.equal(ours, ref), (scale, (ours != ref).sum())


@pytest.mark.parametrize("recipe", ["fp4", "fp4-rot", "w4a16-fp4"])
def test_fp4_runtime_module_matches_the_op(recipe):
    rec, x = _fp4_layer(recipe)
    assert (rec.a_format is None) == (recipe == "w4a16-fp4") and (rec.su is not None) == (recipe == "fp4-rot")
    lin = LowbitFP4Linear(rec, torch.randn(24))
    mod = FP4TableLinear(lin)
    assert mod.route == ("fp4-a16" if recipe == "w4a16-fp4" else "fp4-a4")
    assert torch.equal(mod.codes(), f4.unpack_codes(rec.qweight, 45))
    assert torch.equal(mod.dequantized(), rec.shifted_weight())  # the 16-entry table decodes exactly
    with torch.no_grad():
        assert torch.allclose(mod(x[:6].view(2, 3, 45)), lin(x[:6].view(2, 3, 45)), atol=1e-5, rtol=1e-5)


def test_decompose_swaps_every_lowbit_linear(llama_fp4_checkpoint):
    model, ck = llama_fp4_checkpoint
    int_plan = [(r".*\.(q|k)_proj", "w4"), (r".*\.(v|o)_proj", "w2"), (r".*", "w3")]
    records = {**quantize_all(model, int_plan), **{k: r for k, r in ck.records.items() if ".mlp." in k}}
    q = swap_linears(model, records)
    routes = decompose_lowbit_linears(q)
    assert routes == {k: expected_route(r) for k, r in records.items()}
    assert set(routes.values()) == {"xnnpack-int4", "packed", "fp4-a4", "fp4-a16"}
    assert not any(isinstance(m, (LowbitLinear, LowbitFP4Linear)) for m in q.modules())
    assert load_time_weights(q) is None
    q = swap_linears(model, records)
    routes = decompose_lowbit_linears(q, "xnnpack-load")
    assert routes == {k: expected_route(r, "xnnpack-load") for k, r in records.items()}
    widened = sorted(k for k, r in routes.items() if r == "xnnpack-int4-load")
    assert widened and all(re.fullmatch(r".*\.(v|o)_proj", k) for k in widened)  # the 2-bit layers
    assert sorted(fqn for fqn, _, _ in load_time_weights(q).layers) == widened


def test_a_tied_head_reads_its_embeddings_table_at_load():
    """A head that shares its embedding's record (swap_linears hands it the embedding's tensors) is rebuilt at load
    with int4="xnnpack-load": the weights method's inputs are the gather's own table and scales (the same bytes, so
    the program stores them once) and its outputs are XNNPACK's weight of the head. With "xnnpack" the head keeps
    XNNPACK's own copy; an untied 4-bit head keeps it with either."""
    from executorch.backends.xnnpack.operators.node_visitor import NodeVisitor
    from tinymodels import tiny_llama

    import lowbit_compile as lb
    from lowbit_compile.export.embedding import GatherEmbedding

    model = tiny_llama(tie=True, layers=1)
    ck = lb.quantize(model, "w4", None, overrides={"model.embed_tokens": "w4-rtn-g32"}, progress=False)
    assert ck.records["lm_head"] is ck.records["model.embed_tokens"]
    q = swap_linears(model, ck.records)
    routes = decompose_lowbit_linears(q, "xnnpack-load")
    assert routes["lm_head"] == "xnnpack-int4-load" and routes["model.embed_tokens"] == "gather"
    # the other layers are 4-bit (down_proj too: 344 inputs, per channel): XNNPACK's own copy, as with "xnnpack"
    assert {r for k, r in routes.items() if k not in ("lm_head", "model.embed_tokens")} == {"xnnpack-int4"}
    weights = load_time_weights(q)
    assert [fqn for fqn, _, _ in weights.layers] == ["lm_head"]
    gather = q.get_submodule("model.embed_tokens")
    assert isinstance(gather, GatherEmbedding)
    assert torch.equal(weights.qweight0, gather.qweight) and torch.equal(weights.scales0, gather.scales)
    with torch.no_grad():
        codes, scales = weights()
    head = swap_linears(model, ck.records).lm_head
    expect_codes, expect_scales = int4_weight(head)
    assert torch.equal(codes, NodeVisitor.convert_to_qc4w(expect_codes))
    assert torch.equal(scales, expect_scales.to(torch.bfloat16))
    assert decompose_lowbit_linears(swap_linears(model, ck.records))["lm_head"] == "xnnpack-int4"
    untied = tiny_llama(tie=False, layers=1)
    ck = lb.quantize(untied, "w4", None, overrides={"model.embed_tokens": "w4-rtn-g32", "lm_head": "w4-rtn-g32"},
                     progress=False)
    assert decompose_lowbit_linears(swap_linears(untied, ck.records), "xnnpack-load")["lm_head"] == "xnnpack-int4"


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_e8_packed_linear_decodes_the_records_weight_exactly(bits):
    """E8PackedLinear's in-graph decode (int8 digit tables through index_select) gives the record's rotated weight
    bit for bit, and its forward the reference op's outputs to float rounding, fine-tuned sign vectors included
    (stored as float16: exact)."""
    from tinymodels import e8_records

    from lowbit_compile.export.decompose import E8PackedLinear
    from lowbit_compile.nn import LowbitLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(40, 24)
    rec = e8_records(torch.nn.Sequential(lin), bits, tuned=("0",))["0"]
    ref = LowbitLinear(rec, lin.bias)
    mod = E8PackedLinear(ref)
    assert torch.equal(mod.dequantized(), rec.rotated_weight())
    assert mod.su.dtype == torch.float16 and torch.equal(mod.su.float(), rec.su)
    x = torch.randn(3, 5, 40)
    with torch.no_grad():
        assert torch.allclose(mod(x), ref(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_e8_int4_linear_and_its_load_time_weights(bits):
    """E8Int4Linear (routes e8-xnnpack-int4[-load]): per stage the digits − 8 as int4 codes with scales m·s, plus the
    rank-one ½·m·s term, equal the record's weight exactly (in float, without the int8 activation rounding); its
    eager forward (int8 activations simulated) is within RTOL_INT8_ACTIVATIONS of the reference; LoadTimeWeights
    rebuilds exactly the XNNPACK bytes (codes + 8, two per byte, low nibble first) and scales from the E8 code bytes."""
    from tinymodels import e8_records

    from lowbit_compile.export.decompose import E8Int4Linear, load_time_weights
    from lowbit_compile.export.executorch import RTOL_INT8_ACTIVATIONS
    from lowbit_compile.nn import LowbitLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(40, 24)
    rec = e8_records(torch.nn.Sequential(lin), bits, tuned=("0",))["0"]
    ref = LowbitLinear(rec, lin.bias)
    mod = E8Int4Linear(ref, at_load=True)
    w = sum(getattr(mod, f"codes{k}").float() * getattr(mod, f"channel_scales{k}")[:, None]
            for k in range(mod.stages)) + mod.half_sum * rec.scales.float()
    assert torch.equal(w, rec.rotated_weight())
    x = torch.randn(4, 40)
    with torch.no_grad():
        r = ref(x)
        assert float((mod(x) - r).abs().max()) <= RTOL_INT8_ACTIVATIONS * float(r.abs().max())
    model = torch.nn.Sequential(mod)
    outs = load_time_weights(model)()
    assert len(outs) == 2 * mod.stages
    for k in range(mod.stages):
        nib = (getattr(mod, f"codes{k}").to(torch.int16) + 8).to(torch.uint8).reshape(24, -1, 2)
        assert torch.equal(outs[2 * k], nib[..., 0] | (nib[..., 1] << 4))
        assert torch.equal(outs[2 * k + 1], getattr(mod, f"channel_scales{k}"))
