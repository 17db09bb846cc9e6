"""Property-based fuzzing (hypothesis): recipe parsing, packing of every format, the Hadamard transform over
random sizes, and both export paths on randomly generated small MLP and attention models.

Invariants, not examples: parsing either succeeds with a valid spec or raises LowbitError (never another
exception); every packer has an exact inverse, for any length and leading shape; the transform is
orthonormal and its op equals the reference for every size; an exported file runs and matches the
PyTorch quantized model. The export tests are expensive (seconds per file), so they draw few, derandomized
examples: a stable suite; raise max_examples locally to hunt."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

import lowbit_compile as lb  # noqa: F401  (registers the ops)
from lowbit_compile import formats, hadamard
from lowbit_compile.errors import LowbitError
from lowbit_compile.formats import fp4 as f4
from lowbit_compile.kernels.fp4_ops import dequantize_fp4_weight
from lowbit_compile.kernels.reference import dequantize_weight
from lowbit_compile.recipe import FP4_RECIPES, METHODS, LayerSpec, Recipe, parse_spec

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- recipes


@st.composite
def recipe_texts(draw):
    """Valid recipe strings, in any letter case and with surrounding whitespace."""
    if draw(st.booleans()):
        text = draw(st.sampled_from(sorted(FP4_RECIPES)))
    else:
        method = draw(st.sampled_from(sorted(METHODS)))
        bits = draw(st.sampled_from(METHODS[method].bits))  # the widths the method quantizes to
        group = draw(st.sampled_from([0, 16, 32, 64, 128, 7])) if METHODS[method].grouped else 0
        ft = METHODS[method].tunable and draw(st.booleans())
        text = f"w{bits}" + (f"-{method}" if method else "") + (f"-g{group}" if group else "") + ("-ft" if ft else "")
    text = "".join(c.upper() if draw(st.booleans()) else c for c in text)
    return draw(st.sampled_from(["", " ", "\t"])) + text + draw(st.sampled_from(["", " ", "\n"]))


@FAST
@given(recipe_texts())
def test_every_valid_recipe_string_parses_to_what_it_says(text):
    spec = parse_spec(text)
    name = text.strip().lower()
    if name in FP4_RECIPES:
        assert spec.method == "fp4" and spec.bits == 4 and spec.act_quant == FP4_RECIPES[name]["act_quant"]
        return
    m = re.match(r"w(\d)(?:-([a-z][a-z0-9]*))??(?:-g(\d+))?(-ft)?$", name)
    assert (spec.bits, spec.group_size, spec.finetune) == (int(m[1]), int(m[3] or 0), bool(m[4]))
    assert spec.method == (m[2] or "rtn") and spec.rotate == METHODS[m[2] or ""].rotate
    assert Recipe.parse(text).default == spec


@FAST
@given(bits=st.sampled_from(formats.PACKABLE_BITS), method=st.sampled_from(sorted(METHODS)),
       group=st.sampled_from([0, 16, 7]), ft=st.booleans())
def test_every_method_bits_group_ft_combination_parses_or_raises_lowbit_error(bits, method, group, ft):
    text = f"w{bits}" + (f"-{method}" if method else "") + (f"-g{group}" if group else "") + ("-ft" if ft else "")
    m = METHODS[method]
    valid = bits in m.bits and (m.grouped or not group) and (m.tunable or not ft)
    if valid:
        assert parse_spec(text).bits == bits
    else:
        with pytest.raises(LowbitError):
            parse_spec(text)


override_keys = st.one_of(
    st.sampled_from(["_default", "head", "layers.0.up", "lm_head"]),
    st.text("ab.*+?()[]|^$\\0", max_size=8).map(lambda s: "re:" + s),
    st.text(max_size=6),
)
override_values = st.one_of(st.none(), recipe_texts(), st.text(max_size=6),
                            st.builds(LayerSpec, bits=st.sampled_from([2, 3, 4, 8])))


@FAST
@given(base=st.one_of(recipe_texts(), st.text(max_size=8), st.sampled_from(["2.5bpw", "3.25bpw+fp4", "0.5bpw"])),
       overrides=st.dictionaries(override_keys, override_values, max_size=4),
       seed=st.integers(0, 2**31), names=st.lists(st.text("abcdef._0123", max_size=12), max_size=4))
def test_recipe_with_random_overrides_parses_or_raises_lowbit_error_and_resolves_every_name(base, overrides, seed,
                                                                                            names):
    try:
        rec = Recipe.parse(base, overrides, seed)
    except LowbitError as e:
        assert str(e)  # a message, never an empty error
        return
    assert rec.seed == seed
    if rec.target_bpw is not None:
        assert 1 <= rec.target_bpw <= 16
        return
    for name in names:
        spec, why = rec.spec_for(name)
        assert spec is None or spec.bits in formats.PACKABLE_BITS
        assert why


# ----------------------------------------------------------------------------- packing, every format


shapes = st.tuples(st.lists(st.integers(1, 3), max_size=2), st.integers(1, 70))


@FAST
@given(bits=st.sampled_from(formats.PACKABLE_BITS), shape=shapes, seed=st.integers(0, 2**31))
def test_integer_packing_round_trips_codes_and_bytes_for_any_leading_shape(bits, shape, seed):
    lead, n = shape
    codes = torch.randint(0, 1 << bits, (*lead, n), generator=_gen(seed), dtype=torch.uint8)
    packed = formats.pack(codes, bits)
    assert packed.shape == (*lead, formats.packed_length(n, bits))
    assert torch.equal(formats.unpack(packed, bits, n), codes)
    per_group, _ = formats.packing.group_shape(bits)
    full = n - n % per_group  # whole groups: every byte pattern is some codes, bytes round-trip too
    raw = torch.randint(0, 256, (*lead, formats.packed_length(full, bits)), generator=_gen(seed + 1),
                        dtype=torch.uint8)
    assert torch.equal(formats.pack(formats.unpack(raw, bits, full), bits), raw)


@FAST
@given(bits=st.sampled_from(formats.PACKABLE_BITS), rows=st.integers(1, 5), n=st.integers(1, 96),
       group=st.sampled_from([0, 1, 2, 4, 8, 16, 32]), seed=st.integers(0, 2**31))
def test_the_kernel_decodes_packed_integer_weights_exactly(bits, rows, n, group, seed):
    assume(group == 0 or n % group == 0)
    g = _gen(seed)
    fmt = formats.int_format(bits)
    codes = torch.randint(0, 1 << bits, (rows, n), generator=g, dtype=torch.uint8)
    scales = formats.round_scales(torch.rand(rows, formats.num_groups(n, group), generator=g) + 1e-3)
    ref = formats.dequantize(codes, scales, fmt, group)
    assert torch.equal(dequantize_weight(formats.pack(codes, bits), scales, bits, n, group), ref)
    w = ref + (torch.rand(rows, n, generator=g) - 0.5) * formats.expand_scales(scales, n, group) * 0.99
    assert torch.equal(formats.quantize_codes(w, scales, fmt, group), codes)  # nearest level, within half a step


@FAST
@given(fmt=st.sampled_from(sorted(f4.FP4_FORMATS)), shape=shapes, seed=st.integers(0, 2**31),
       log2_scale=st.integers(-8, 8), special=st.booleans())
def test_fp4_encode_pack_unpack_decode_is_quantize_for_any_values(fmt, shape, seed, log2_scale, special):
    lead, n = shape
    x = torch.randn(*lead, n, generator=_gen(seed)) * 2.0 ** (log2_scale + 2)
    if special:  # zeros of both signs, saturation and exact ties
        flat = x.view(-1)
        picks = [0.0, -0.0, float("inf"), -float("inf"), 1e30, 2.0**log2_scale * 0.25, -(2.0**log2_scale) * 2.5]
        flat[: min(len(picks), flat.numel())] = torch.tensor(picks[: flat.numel()])
    f, scale = f4.fp4_format(fmt), 2.0**log2_scale
    codes = f4.encode(x, f, scale)
    assert int(codes.max()) < 16
    back = f4.unpack_codes(f4.pack_codes(codes), n)
    assert torch.equal(back, codes)
    assert torch.equal(f4.decode(back, f, scale), f4.quantize(x, f, scale))
    rows = codes.reshape(-1, n)
    w_scales = torch.full((rows.shape[0], 1), scale, dtype=torch.float16)
    assert torch.equal(dequantize_fp4_weight(f4.pack_codes(rows), w_scales, fmt, n), f4.decode(rows, f, scale))


# ----------------------------------------------------------------------------- the Hadamard transform


def _sizes():
    """Powers of two, K·2^k with K of every construction, and arbitrary sizes (odd parts, primes)."""
    return st.one_of(st.integers(0, 11).map(lambda k: 1 << k),
                     st.tuples(st.sampled_from([12, 20, 28, 36, 44, 52, 60, 76, 108, 172]),
                               st.integers(0, 3)).map(lambda t: t[0] << t[1]),
                     st.integers(1, 600))


@settings(max_examples=40, deadline=None)
@given(n=_sizes(), seed=st.integers(0, 2**31), rows=st.integers(1, 3))
def test_hadamard_is_orthonormal_invertible_and_the_op_matches_for_any_size(n, seed, rows):
    p = hadamard.plan(n)
    assert p.factor_size * p.pow2 == n and p.pow2 & (p.pow2 - 1) == 0
    signs, f = hadamard.random_signs(n, seed), hadamard.factor(n)
    x = torch.randn(rows, n, generator=_gen(seed), dtype=torch.float64)
    y = hadamard.apply(x, signs.double(), f)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)  # the factor is float32-orthonormal
    assert torch.allclose(hadamard.apply(y, signs.double(), f, inverse=True), x, atol=1e-5)
    x32 = x.float()
    op = torch.ops.lowbit.hadamard(x32, signs, f)
    assert op.dtype == torch.float32 and torch.allclose(op, hadamard.apply(x32, signs, f), atol=1e-5)
    assert torch.allclose(torch.ops.lowbit.hadamard(op, signs, f, True), x32, atol=1e-4)


@settings(max_examples=20, deadline=None)
@given(odd=st.integers(hadamard.MAX_RANDOM_FACTOR // 2 + 1, 50_000).map(lambda m: 2 * m + 1), k=st.integers(0, 4))
def test_sizes_without_a_transform_are_refused_with_what_to_do(odd, k):
    with pytest.raises(LowbitError, match=r"no Hadamard construction is known .* too large .*per-layer override"):
        hadamard.plan(odd << k)


# ----------------------------------------------------------------------------- export paths


class Attention(torch.nn.Module):
    def __init__(self, d, heads, bias):
        super().__init__()
        self.heads = heads
        self.norm = torch.nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d, bias=bias) for _ in range(4))

    def forward(self, x):
        b, t, d = x.shape
        h = self.norm(x)
        q, k, v = (m(h).view(b, t, self.heads, d // self.heads).transpose(1, 2) for m in (self.q, self.k, self.v))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.o(a.transpose(1, 2).reshape(b, t, d))


class MLP(torch.nn.Module):
    def __init__(self, dims, bias):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(a, b, bias=bias) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.nn.functional.gelu(x)
        return x


LAYER_RECIPES = ["w2", "w3", "w4", "w8", "w2-rtn", "w4-rtn", "w4-g32", "w3-g16", "w4a16-fp4"]


@st.composite
def quantized_models(draw):
    """(model, records, width): an MLP of 1-3 linears of random widths, or a pre-norm attention block; each
    linear gets a random recipe (group sizes only where they divide the layer)."""
    torch.manual_seed(draw(st.integers(0, 2**16)))
    bias = draw(st.booleans())
    if draw(st.booleans()):
        dims = draw(st.lists(st.integers(2, 80), min_size=2, max_size=4))
        model = MLP(dims, bias)
    else:
        heads = draw(st.integers(1, 3))
        model = Attention(heads * draw(st.sampled_from([4, 8, 12, 16])), heads, bias)
    model.eval()
    from lowbit_compile.quantize.layer import quantize_weight

    records = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or not draw(st.integers(0, 4)):  # some layers stay float
            continue
        recipe = draw(st.sampled_from(LAYER_RECIPES))
        spec = parse_spec(recipe)
        if spec.group_size and mod.in_features % spec.group_size:
            spec = parse_spec(recipe.split("-g")[0])
        sample = torch.randn(64, mod.in_features) if spec.method == "fp4" else None
        records[name] = quantize_weight(name, mod.weight, spec, seed=0, sample=sample)
    width = model.layers[0].in_features if isinstance(model, MLP) else model.q.in_features
    return model, records, width


def _reference(model, records, x):
    with torch.no_grad():
        return lb.swap_linears(model, records)(x)


# No shrinking: each step would export again (minutes); the failing example is printed as drawn.
EXPORT = settings(max_examples=3, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("suffix", [".onnx", ".pte"])
def test_each_export_path_runs_random_small_models_and_matches_pytorch(suffix, tmp_path_factory):
    pytest.importorskip("onnxruntime" if suffix == ".onnx" else "executorch")

    @settings(EXPORT, max_examples=3 if suffix == ".onnx" else 2)  # a .pte costs ~10 s to lower
    @given(quantized_models(), st.integers(1, 2), st.integers(1, 6))
    def check(model_records, batch, seq):
        model, records, width = model_records
        path = tmp_path_factory.mktemp("export") / f"model{suffix}"
        # batch 2 in the example: a .pte traced at batch 1 keeps batch 1 only (0/1 specialization; reported)
        example = torch.randn(2, 4, width)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = lb.export(model, records, (example,), path)  # verifies on the example before writing
        x = torch.randn(batch, seq, width)  # another batch and sequence length: dynamic shapes
        ref = _reference(model, records, x)
        if suffix == ".onnx":
            import onnx

            from lowbit_compile.export.onnx import run_onnx

            got = run_onnx(path, {onnx.load(str(path)).graph.input[0].name: x})
            tol = 2e-3
        else:
            from lowbit_compile.export.executorch import RTOL_FLOAT, RTOL_INT8_ACTIVATIONS, run_pte

            got = run_pte(path, [x])[0]
            int8 = any(route.startswith("xnnpack-int4") for route in res.routes.values())  # int8 activations
            tol = RTOL_INT8_ACTIVATIONS if int8 else RTOL_FLOAT
        assert got.shape == ref.shape
        err = float((got - ref).abs().max())
        assert err <= tol * float(ref.abs().max()) + 1e-5, (err, {f: r.fmt for f, r in records.items()})

    check()
