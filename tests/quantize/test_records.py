"""The E8 record kind (quantize/records.E8QuantizedLinear): checkpoint round trip next to the other kinds, files of
the previous format version, and its bits per weight as stored."""

import json

import pytest
import torch

from lowbit_compile import checkpoint
from lowbit_compile.checkpoint import Checkpoint
from lowbit_compile.nn import swap_linears
from lowbit_compile.quantize.e8 import quantize_e8_linear
from lowbit_compile.quantize.layer import quantize_weight
from lowbit_compile.quantize.records import RECORD_KINDS, E8QuantizedLinear, QuantizedLinear
from lowbit_compile.recipe import parse_spec

pytestmark = pytest.mark.usefixtures("one_thread")


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16)).eval()


def _records(model):
    h = torch.eye(64, dtype=torch.float64) + 0.5
    return {"0": quantize_e8_linear(model[0].weight, h, 3, seed=1, fqn="0"),
            "2": quantize_weight("2", model[2].weight, parse_spec("w4"), seed=1)}


def test_e8_records_save_and_load_next_to_integer_records(tmp_path):
    model = _model()
    recs = _records(model)
    recs["0"].su = (recs["0"].su * 1.25).half().float()  # a tuned (real) sign vector is stored as well
    path = Checkpoint(records=recs, recipe="w3-e8").save(tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / checkpoint.META_FILE).read_text())
    assert meta["records"]["0"]["kind"] == "e8" and meta["records"]["2"]["kind"] == "int"
    loaded = Checkpoint.load(path).records
    assert type(loaded["0"]) is E8QuantizedLinear and type(loaded["2"]) is QuantizedLinear
    assert RECORD_KINDS["e8"] is E8QuantizedLinear
    assert recs["0"].bias is None and loaded["0"].bias is None  # none of its own (no bias correction here)
    for name in set(E8QuantizedLinear.TENSORS) - {"bias"}:
        assert torch.equal(getattr(loaded["0"], name), getattr(recs["0"], name))
    for name in E8QuantizedLinear.FIELDS:
        assert getattr(loaded["0"], name) == getattr(recs["0"], name)
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(swap_linears(model, loaded)(x), swap_linears(model, recs)(x))


def test_a_file_of_the_previous_format_version_still_loads(tmp_path):
    """E8 records need no new file layout: a file that says format version 2 loads (its checksums recomputed as a
    version-2 writer made them)."""
    model = _model()
    path = Checkpoint(records=_records(model), recipe="w3-e8").save(tmp_path / "ck")
    meta_path = tmp_path / "ck" / checkpoint.META_FILE
    meta = json.loads(meta_path.read_text())
    meta["format_version"] = 2
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    meta["meta_sha256"] = checkpoint._sha256(checkpoint._meta_text(body).encode())
    meta_path.write_text(checkpoint._meta_text(meta))
    loaded = Checkpoint.load(path)
    assert isinstance(loaded.records["0"], E8QuantizedLinear) and loaded.records["2"].kind == "int"


def test_bits_per_weight_counts_codes_scales_and_signs_as_stored():
    rec = quantize_e8_linear(torch.randn(128, 512), torch.eye(512, dtype=torch.float64), 2, fqn="l")
    assert rec.bits_per_weight() == pytest.approx((128 * 128 * 8 + 128 * 16 + 512 + 128) / (128 * 512))
    assert abs(rec.bits_per_weight() - 2) < 0.1
    rec.sv = rec.sv * 1.5  # real-valued after fine-tuning: 16 bits each
    assert rec.bits_per_weight() == pytest.approx((128 * 128 * 8 + 128 * 16 + 512 + 128 * 16) / (128 * 512))
    assert rec.fmt == "e8p2" and rec.group_size == 0
