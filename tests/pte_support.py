"""Shared by the ExecuTorch export tests (test_executorch, test_decompose, test_fp4_flips): recipes per layer,
reference outputs of the PyTorch quantized model and the checks a written program must pass."""

from __future__ import annotations

import contextlib
import re

import pytest
import tinymodels
import torch

pytest.importorskip("executorch")
pytest.importorskip("torchao")


from lowbit_compile.export.executorch import (
    ROUTE_RTOL,
    max_rel_error,
    run_pte,
)
from lowbit_compile.export.fp4_flips import explain_by_flips
from lowbit_compile.nn import swap_linears
from lowbit_compile.quantize import fp4 as fp4_search
from lowbit_compile.quantize.layer import quantize_weight
from lowbit_compile.recipe import parse_spec

SHIFT_OP = "aten::bitwise_right_shift.Tensor_out"
TABLE_OP = "aten::index_select.out"

# Mixed plans: a recipe per layer pattern (first match wins). They cover XNNPACK int4 per channel and in
# groups, and the packed route at 2, 3 and 4 bits.
LLAMA_MIXED = [(r".*\.(q|k|v)_proj", "w4"), (r".*\.o_proj", "w4-g64"), (r".*\.(gate|up)_proj", "w2"),
               (r".*\.down_proj", "w3")]
MINILM_MIXED = [(r".*\.attention\.self\.(query|key|value)", "w4-g32"), (r".*\.attention\.output\.dense", "w3"),
                (r".*\.intermediate\.dense", "w2"), (r".*\.output\.dense", "w4")]
# One FP4 checkpoint with every FP4 recipe: fp4 (W4A4 + exponents) on attention, fp4-rot on gate/up (one rotation
# for both), w4a16-fp4 on down.
LLAMA_FP4_OVERRIDES = {r"re:.*\.mlp\.(gate|up)_proj": "fp4-rot", r"re:.*\.mlp\.down_proj": "w4a16-fp4"}


def quantize_all(model, plan, skip=r"(^|.*\.)(lm_head|pooler\..*)$", seed=0):
    """Records for every nn.Linear not matching `skip`; `plan` is a recipe or [(pattern, recipe), ...]."""
    records = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or re.fullmatch(skip, name):
            continue
        recipe = plan if isinstance(plan, str) else next(r for p, r in plan if re.fullmatch(p, name))
        records[name] = quantize_weight(name, mod.weight, parse_spec(recipe), seed=seed)
    return records


@contextlib.contextmanager
def short_fp4_search():
    """The FP4 search on a 3-point clipping grid, one round (as tests/test_fp4_pipeline.py): the same code."""
    saved = fp4_search.CLIP_GRID, fp4_search.SEARCH_ROUNDS
    fp4_search.CLIP_GRID, fp4_search.SEARCH_ROUNDS = (0.6, 0.8, 1.0), 1
    try:
        yield
    finally:
        fp4_search.CLIP_GRID, fp4_search.SEARCH_ROUNDS = saved


def token_batches(n=2, vocab=320):
    """Two seeded batches of 2 × 16 token ids (tinymodels.token_batches)."""
    return tinymodels.token_batches(n, vocab, (2, 16))


def quantized_model(model, records):
    """The PyTorch quantized model (the lowbit ops): the reference."""
    q = swap_linears(model, records).eval()
    if hasattr(getattr(q, "config", None), "use_cache"):
        q.config.use_cache = False
    return q


def outputs(model, inputs):
    with torch.no_grad():
        out = model(*inputs)
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def reference_outputs(model, records, inputs):
    return outputs(quantized_model(model, records), inputs)


def matches(ys, model, records, inputs, rtol):
    """The program's outputs `ys` are the quantized model's on `inputs` within rtol, or are explained by a few W4A4
    activations that rounded the other way at an FP4 rounding midpoint (fp4_flips.py: the inputs of W4A4 layers
    come from float ops the program computes in another order)."""
    q = quantized_model(model, records)
    if max_rel_error(ys, outputs(q, inputs)) <= rtol:
        return True
    return explain_by_flips(q, lambda: outputs(q, inputs), ys, lambda a, b: max_rel_error(a, b) / rtol, 1.0) is not None


def check_file(result, model, records, inputs):
    """Independently of export_pte's own check: the written file runs and matches the quantized model at the
    tolerance of its routes."""
    ys = run_pte(result.path, inputs)
    assert matches(ys, model, records, inputs, max(ROUTE_RTOL[r] for r in result.routes.values()))
    return ys


def expected_route(rec, int4="xnnpack"):
    if rec.kind == "fp4":
        return "fp4-a16" if rec.a_format is None else "fp4-a4"
    channelwise = rec.group_size in (0, rec.in_features)  # an even in_features; blocks of 32·k otherwise
    if rec.bits not in (2, 3, 4) or (rec.in_features % 2 if channelwise else rec.group_size % 32):
        return "packed"
    if int4 == "xnnpack-load" and rec.bits != 4 and rec.in_features % 8 == 0:
        return "xnnpack-int4-load"
    return "xnnpack-int4" if rec.bits == 4 or int4 == "xnnpack-wide" else "packed"


def mlp(dims=(512, 1376, 512)):
    """Linears with GELUs between them; by default the linears dominate the file: 2 × 512·1376 weights (1.4 M),
    Llama-MLP-sized. Linears at even indices ("0", "2", ...)."""
    torch.manual_seed(0)
    layers = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.GELU()]
    return torch.nn.Sequential(*layers[:-1]).eval()

