"""export/fp4_flips.py: explaining a W4A4 mismatch by activations rounded the other way at an FP4 midpoint."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("executorch")
pytest.importorskip("torchao")


from pte_support import (  # noqa: E402
    short_fp4_search,
)

import lowbit_compile as lb  # noqa: E402
from lowbit_compile.export.executorch import (  # noqa: E402
    RTOL_FLOAT,
    max_rel_error,
)
from lowbit_compile.export.fp4_flips import explain_by_flips  # noqa: E402
from lowbit_compile.formats import fp4 as f4  # noqa: E402
from lowbit_compile.nn import swap_linears  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("outward", [True, False])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_explain_by_flips_finds_an_activation_rounded_the_other_way(sign, outward):
    """A program whose W4A4 input landed 1 ulp across a rounding midpoint is the reference with that one
    activation flipped (positive or negative, to the larger or the smaller magnitude); a program that is off
    everywhere is not explained by a few flips."""
    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.ReLU(), torch.nn.Linear(40, 16)).eval()
    with short_fp4_search():
        ck = lb.quantize(model, "fp4", [torch.randn(64, 24)], progress=False)
    qmodel = swap_linears(model, ck.records).eval()
    rec = ck.records["0"]
    s = float(rec.act_scale)
    k = torch.ones(24) if rec.act_exponents is None else f4.exponent_multipliers(rec.act_exponents)
    mid = float(f4.fp4_format(rec.a_format).magnitudes()[4:6].mean())  # a tie goes down, to the even code 4
    x = torch.randn(3, 24) * 0.1
    x[1, 7] = sign * mid * s / k[7]  # exactly on a midpoint: rounds the tie to the even code (the smaller one)
    nudged = x.clone()
    nudged[1, 7] = torch.nextafter(x[1, 7], torch.tensor(sign * 1e9))  # 1 ulp further out: rounds up
    if not outward:  # the reference's input is the one 1 ulp out, the program's the tie
        x, nudged = nudged, x

    def error(ys, refs):
        return max_rel_error(ys, refs) / RTOL_FLOAT

    with torch.no_grad():
        ref, ys = qmodel(x), qmodel(nudged)
    assert error([ys], [ref]) > 100  # one flip is far beyond the float tolerance
    flips = explain_by_flips(qmodel, lambda: [qmodel(x)], [ys], error, 1.0)
    assert [(f.layer, f.call, f.index) for f in flips] == [("0", 0, 1 * 24 + 7)]
    assert "layer 0: input channel 7 of token 1" in flips[0].describe()
    assert explain_by_flips(qmodel, lambda: [qmodel(x)], [ref], error, 1.0) == []
    assert explain_by_flips(qmodel, lambda: [qmodel(x)], [ys * 1.01], error, 1.0) is None
