"""Reliability (docs/reliability.md): bad input fails clearly (what, where, what to do), an interrupted run loses
nothing, and the same inputs reproduce the same bytes.

The models here are small stacks of pre-norm MLP blocks (`Net`): calibration, QuIP and compile take a fraction
of a second on them, so each catalogue row costs little. Rows covered elsewhere are named in the catalogue."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
import warnings

import pytest
import torch
from tinymodels import with_weights

import lowbit_compile as lb
from lowbit_compile import pipeline
from lowbit_compile.checkpoint import Checkpoint, QuantizedLinear
from lowbit_compile.errors import LowbitError
from lowbit_compile.io import atomic_outputs, atomic_write, atomic_write_bytes
from lowbit_compile.quantize import core
from lowbit_compile.quantize.layer import quantize_fp4_group, quantize_weight

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_compiler")  # conftest fixtures

D, H = 24, 40


class Block(torch.nn.Module):
    def __init__(self, d=D, h=H):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)
        self.up = torch.nn.Linear(d, h)
        self.down = torch.nn.Linear(h, d)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(self.norm(x))))


class Net(torch.nn.Module):
    """`blocks` repeated blocks and a head (not named lm_head, so it is quantized too)."""

    def __init__(self, blocks=3, d=D, h=H, out=12, graph_break=False):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(Block(d, h) for _ in range(blocks))
        self.head = torch.nn.Linear(d, out)
        self.graph_break = graph_break

    def forward(self, x):
        x = self.layers[0](x)
        if self.graph_break:
            torch._dynamo.graph_break()
        for block in self.layers[1:]:
            x = block(x)
        return self.head(x)


class BreakInLoop(Net):
    """A graph break inside the loop over blocks: Dynamo skips this frame (the head runs in eager, in float)
    and compiles Block.forward once, then reuses that graph for every block instance."""

    def forward(self, x):
        for block in self.layers:
            x = block(x)
            torch._dynamo.graph_break()
        return self.head(x)


def data(n=2, d=D, tokens=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, tokens, d, generator=g) for _ in range(n)]


def linears(model):
    return {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}




def compiled(model, options, x):
    """One call of the compiled model; reference kernels, so outputs compare exactly with eager modules."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.compile(model, backend="lowbit",
                             options={"compiler": "eager", "kernels": "reference", **options})(x)


def read(path):
    return {f: open(os.path.join(path, f), "rb").read() for f in ("lowbit.json", "lowbit.safetensors")}


# ----------------------------------------------------------------------------- recipes and options


def test_unknown_recipes_overrides_and_bit_widths_in_quantize_are_clear_errors():
    net = Net(blocks=1)
    with pytest.raises(LowbitError, match="unknown recipe 'w4-fast'; valid recipes: w2, "):
        lb.quantize(net, "w4-fast", progress=False)
    with pytest.raises(LowbitError, match="unknown recipe 'w7'"):
        lb.quantize(net, "w4", overrides={"head": "w7"}, progress=False)
    with pytest.raises(LowbitError, match=r"6-bit weights are not supported; valid bit widths: \(2, 3, 4, 8\)"):
        lb.quantize(net, "w4", overrides={"head": lb.LayerSpec(bits=6)}, progress=False)
    with pytest.raises(LowbitError, match="not a valid regular expression"):
        lb.quantize(net, "w4", overrides={"re:(": None}, progress=False)
    with pytest.raises(TypeError, match="unexpected keyword argument 'recipy'"):
        lb.quantize(net, recipy="w4")


# ----------------------------------------------------------------------------- non-finite values


@pytest.mark.parametrize("recipe", ["w4", "w3-quip", "fp4"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_name_the_layer_before_any_calibration(recipe, bad, monkeypatch):
    net = Net(blocks=2)
    with torch.no_grad():
        net.layers[1].up.weight[3, 2] = bad
    monkeypatch.setattr(pipeline, "calibrate_blocks", None)  # checked up front: calibration never starts
    with pytest.raises(LowbitError, match=r"layer layers\.1\.up: weight has \d NaN and \d Inf values.*"
                                          r"overrides=\{'layers\.1\.up': None\}"):
        lb.quantize(net, recipe, data(1), progress=False)
    if recipe == "w4":  # data-free: the override is the way out (a calibrated recipe still runs the float layer)
        ck = lb.quantize(net, recipe, overrides={"layers.1.up": None}, progress=False)
        assert "layers.1.up" not in ck.records and len(ck.records) == 4


def test_non_finite_calibration_data_names_the_batch_and_input():
    batches = data(3)
    batches[1][0, 5, 7] = float("nan")
    with pytest.raises(LowbitError, match=r"calibration batch 1, input 'input': 1 NaN/Inf value\(s\) \(first at "
                                          r"index \(0, 5, 7\)\); clean the calibration data \(it reached the input "
                                          r"of block layers\.0"):
        lb.quantize(Net(), "w3-quip", batches, progress=False)
    batch = {"x": torch.zeros(1, 4, D)}
    batch["x"][0, 3, 0] = float("-inf")
    with pytest.raises(LowbitError, match=r"calibration batch 0, input 'x': 1 NaN/Inf"):
        lb.quantize(Net(), "fp4", [batch], progress=False)


def test_a_model_that_makes_nan_from_clean_data_names_the_block():
    net = Net()
    with torch.no_grad():
        net.layers[1].norm.weight[0] = float("inf")
    with pytest.raises(LowbitError, match=r"the output of block layers\.1 \(its input is finite\): NaN or Inf in the "
                                          r"float model \(calibration batch 0\).*the model.s weights \(norms"):
        lb.quantize(net, "w3-quip", data(), progress=False)


# ----------------------------------------------------------------------------- calibration batches


def test_empty_zero_token_and_mismatched_calibration_batches():
    net = Net(blocks=1)
    with pytest.raises(LowbitError, match="calibration set is empty"):
        lb.quantize(net, "w3-quip", [], progress=False)
    with pytest.raises(LowbitError, match=r"the 2 calibration batch\(es\) hold no tokens"):
        lb.quantize(net, "w3-quip", [torch.empty(2, 0, D), torch.empty(0, 5, D)], progress=False)
    with pytest.raises(LowbitError, match=r"calibration batch 1 does not fit the model \(RuntimeError: .*\); give "
                                          r"batches shaped like the model's inputs"):
        lb.quantize(net, "w3-quip", [torch.randn(1, 4, D), torch.randn(1, 4, D + 1)], progress=False)


def test_batches_of_different_lengths_are_fine_and_counted_in_tokens():
    ck = lb.quantize(Net(blocks=1), "w3-quip", [torch.randn(1, 3, D), torch.randn(2, 11, D)], progress=False)
    assert ck.calibration["tokens"] == 3 + 22 and ck.calibration["batches"] == 2 and len(ck.records) == 3


def test_a_single_token_gives_a_singular_hessian_that_damping_recovers():
    ck = lb.quantize(Net(blocks=1), "w2-quip", [torch.randn(1, 1, D)], progress=False)
    assert len(ck.records) == 3
    assert all(r.proxy_loss is not None and r.proxy_loss >= 0 for r in ck.records.values())


def test_a_linear_no_calibration_reaches_stays_float_with_the_reason(caplog):
    net = Net(blocks=1)
    net.layers[0].unused = torch.nn.Linear(D, 4)  # defined, never called in forward
    with caplog.at_level("WARNING", logger="lowbit_compile"):
        ck = lb.quantize(net, "w3-quip", data(1), progress=False)
    plan = {p["fqn"]: p for p in ck.plan}
    assert "layers.0.unused" not in ck.records and plan["layers.0.unused"]["spec"] == "float"
    assert plan["layers.0.unused"]["reason"] == "no calibration data reached this layer"
    assert "layer layers.0.unused received no calibration data; kept in float" in caplog.text
    assert "layers.0.unused" in lb.quantize(net, "w4", progress=False).records  # data-free: needs none


def test_a_mixed_precision_budget_needs_lb_quantize_before_compile():
    with pytest.raises(LowbitError, match=r"recipe '2\.5bpw' is a mixed-precision budget.*lb\.quantize\(model, "
                                          r"'2\.5bpw', calibration\)"):
        lb.BackendSettings.from_options({"recipe": "2.5bpw"})


# ----------------------------------------------------------------------------- shapes and structure


@pytest.mark.parametrize("recipe", ["w2", "w3", "w3-quip", "w4a16-fp4"])
def test_odd_widths_are_padded_by_the_packer_and_run_exactly(recipe):
    net = Net(blocks=1, d=7, h=11, out=5)  # 7 and 11: no Hadamard, codes do not fill whole bytes
    ck = lb.quantize(net, recipe, data(1, d=7), progress=False)
    rec = ck.records["layers.0.up"]
    assert rec.qweight.shape[-1] == {"w2": 2, "w3": 3}.get(recipe[:2], 4)  # ceil(7 codes / per byte group)
    x = torch.randn(3, 7)
    with torch.no_grad():
        ref = with_weights(net, ck.records)(x)
        assert torch.allclose(lb.swap_linears(net, ck.records)(x), ref, atol=1e-5)
    assert torch.allclose(compiled(net, {"checkpoint": ck}, x), ref, atol=1e-5)


def test_a_group_size_that_does_not_divide_the_layer_is_refused_naming_it():
    with pytest.raises(LowbitError, match=r"layer layers\.0\.up: group size 4 does not divide in_features=7.*"
                                          r"group_size=0"):
        lb.quantize(Net(blocks=1, d=7, h=12), "w4-g4", progress=False)
    with pytest.raises(LowbitError, match=r"layer layers\.0\.up: group size 4 does not divide in_features=7"):
        lb.quantize(Net(blocks=1, d=7, h=12), "w4-quip-g4", data(1, d=7), progress=False)


@pytest.mark.parametrize("recipe,fix", [("w4-rtn-g128", "w4-rtn-g24"), ("w2-g20", "w2-g12"),
                                        ("w3-optq-g16", "w3-optq-g12")])
def test_the_compile_path_names_the_layer_a_group_size_does_not_divide_and_the_override_that_fixes_it(recipe, fix):
    net, x = Net(blocks=1), data(1)[0]  # in_features: 24 (layers.0.up, head) and 40 (layers.0.down)
    per_channel = recipe.rsplit("-g", 1)[0]
    with pytest.raises(Exception, match=rf"layer layers\.0\.up: group size \d+ does not divide in_features=24; .*"
                                        rf"overrides=\{{'layers\.0\.up': '{fix}'\}}.*group_size=0\): "
                                        rf"overrides=\{{'layers\.0\.up': '{per_channel}'\}}"):
        compiled(net, {"recipe": recipe}, x)
    # the suggested overrides compile
    compiled(net, {"recipe": recipe, "overrides": {"layers.0.up": fix, "head": fix, "layers.0.down": per_channel}}, x)
    specs = {layer.fqn: layer.spec for layer in lb.last_report().layers}
    assert specs["layers.0.up"].endswith(f"group {fix.rsplit('-g', 1)[1]}") and "group" not in specs["layers.0.down"]


def test_the_compile_path_refuses_a_bad_group_size_before_calibrating(monkeypatch):
    from lowbit_compile import backend

    def calibrate(*a, **k):
        raise AssertionError("calibrated before the group-size check")

    monkeypatch.setattr(backend, "_first_call_hessians", calibrate)
    with pytest.raises(Exception, match=r"layer layers\.0\.up: group size 16 does not divide in_features=24"):
        compiled(Net(blocks=1), {"recipe": "w3-optq-g16"}, data(1)[0])


@pytest.mark.parametrize("recipe", ["w4", "w4-quip", "fp4"])
def test_a_model_without_linears_gives_an_empty_checkpoint_with_a_warning(recipe, caplog, tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv1d(2, 2, 3), torch.nn.ReLU())
    with caplog.at_level("WARNING", logger="lowbit_compile"):
        ck = lb.quantize(model, recipe, [torch.randn(1, 2, 8)], progress=False)
    assert ck.records == {} and ck.plan == [] and "no nn.Linear layers" in caplog.text
    assert Checkpoint.load(ck.save(tmp_path / "ck")).records == {}


def test_graph_breaks_quantize_every_subgraph_and_report_each():
    net = Net(graph_break=True)
    x = torch.randn(2, 5, D)
    y = compiled(net, {"recipe": "w4"}, x)
    assert len(lb.REPORTS) == 2  # one report per graph Dynamo hands over
    assert {r.fqn for rep in lb.REPORTS for r in rep.quantized} == linears(net)
    assert sum(rep.rewritten for rep in lb.REPORTS) == len(linears(net))
    records = {f: r for rep in lb.REPORTS for f, r in rep.records.items()}
    with torch.no_grad():
        assert torch.allclose(y, with_weights(net, records)(x), atol=1e-5)

    ck = lb.quantize(net, "w3-quip", data(), progress=False)  # a checkpoint fits each part of the model
    lb.reset()
    torch._dynamo.reset()
    y = compiled(net, {"checkpoint": ck}, x)
    assert [rep.rewritten for rep in lb.REPORTS] == [2, 5]
    with torch.no_grad():
        assert torch.equal(y, lb.swap_linears(net, ck.records)(x))


def test_a_graph_break_inside_the_block_loop_quantizes_each_block_with_its_own_weights():
    net = BreakInLoop()
    x = torch.randn(2, 5, D)
    y = compiled(net, {"recipe": "w4"}, x)
    ref = Net()  # the same weights; each block gets the dequantized weights of its own report ("up", "down")
    with torch.no_grad():
        for rep, block in zip(lb.REPORTS, ref.layers):
            for name in ("up", "down"):
                getattr(block, name).weight.copy_(rep.records[name].dequantized_weight())
        assert len(lb.REPORTS) == 3 and torch.allclose(y, ref(x), atol=1e-5)


class Shared(torch.nn.Module):
    """`twice` is called twice; `a` and `b` are two modules holding one Parameter."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.twice = torch.nn.Linear(D, D)
        self.a = torch.nn.Linear(D, H)
        self.b = torch.nn.Linear(D, H, bias=False)
        self.b.weight = self.a.weight

    def forward(self, x):
        x = self.twice(torch.relu(self.twice(x)))
        return self.a(x) + self.b(x)


@pytest.mark.parametrize("recipe", ["w4", "w3-quip"])
def test_shared_modules_and_tied_weights_quantize_once_per_module(recipe):
    model = Shared()
    x = torch.randn(2, 3, D)
    ck = lb.quantize(model, recipe, [torch.randn(2, 8, D)], progress=False)
    assert set(ck.records) == {"twice", "a", "b"}
    with torch.no_grad():
        swapped = lb.swap_linears(model, ck.records)
        assert swapped.a.qweight is not swapped.b.qweight and model.a.weight is model.b.weight  # untouched
        y = swapped(x)
    assert torch.equal(compiled(model, {"checkpoint": ck}, x), y)
    assert sorted(r.fqn for r in lb.last_report().quantized) == ["a", "b", "twice", "twice"]
    lb.reset()
    torch._dynamo.reset()
    compiled(model, {"recipe": "w4"}, x)  # the backend quantizes the shared Parameter for each of its modules
    assert sorted(r.fqn for r in lb.last_report().quantized) == ["a", "b", "twice", "twice"]


# ----------------------------------------------------------------------------- checkpoints that do not fit


def test_a_checkpoint_of_another_model_is_refused_with_every_difference():
    ck = lb.quantize(Net(), "w4", progress=False)
    with pytest.raises(LowbitError, match=r"(?s)belongs to another model than Net; 2 difference.*\n  layers\.3\.up: a "
                                          r"linear of this model that the checkpoint does not know"):
        ck.check_model(Net(blocks=4))
    with pytest.raises(LowbitError) as err:
        ck.check_model(Net(h=48))
    assert "6 difference(s)" in str(err.value) and "layers.2.down: the model's weight is 24x48, the checkpoint's " \
                                                   "24x40" in str(err.value)
    assert ck.differences({n: (m.out_features, m.in_features) for n, m in Net().named_modules()
                           if isinstance(m, torch.nn.Linear)}) == []


def test_the_backend_refuses_a_checkpoint_of_another_model():
    ck = lb.quantize(Net(), "w4", progress=False)
    x = torch.randn(1, 2, D)
    with pytest.raises(Exception, match=r"(?s)belongs to another model than the compiled graph; 6 difference.*"
                                        r"layers\.0\.up: the model's weight is 48x24, the checkpoint's 40x24"):
        compiled(Net(h=48), {"checkpoint": ck}, x)
    with pytest.raises(Exception, match=r"layers\.3\.up: a linear of this model that the checkpoint does not know"):
        compiled(Net(blocks=4), {"checkpoint": ck}, x)
    # a block compiled on its own names its linears "up", "down"; the same weights are found by their digest
    block = Net().layers[0]
    with torch.no_grad():
        ref = lb.swap_linears(block, {k[len("layers.0."):]: v for k, v in ck.records.items()
                                      if k.startswith("layers.0.")})(x)
    assert torch.equal(compiled(block, {"checkpoint": ck}, x), ref)
    assert {r.fqn for r in lb.last_report().quantized} == {"layers.0.up", "layers.0.down"}
    other = Net().layers[0]  # the block of another model: nothing matches, by name or by content
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01)
    with pytest.raises(Exception, match=r"no linear of this model is in the checkpoint \(compile or export the module"):
        compiled(other, {"checkpoint": ck}, x)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        torch.compile(Net(h=48), backend="lowbit", options={"checkpoint": ck, "fallback": True,
                                                            "compiler": "eager"})(x)
    assert any("belongs to another model" in str(w.message) and "running this graph in float" in str(w.message)
               for w in caught)


# ----------------------------------------------------------------------------- damaged checkpoints


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return lb.quantize(Net(blocks=1), "w3-quip", data(1), progress=False).save(tmp_path_factory.mktemp("ck") / "ck")


def _copy(src, dst):
    os.makedirs(dst)
    for f, b in read(src).items():
        open(os.path.join(dst, f), "wb").write(b)
    return str(dst)


def test_an_edited_or_truncated_json_is_refused(saved, tmp_path):
    path = _copy(saved, tmp_path / "ck")
    meta_path = os.path.join(path, "lowbit.json")
    text = open(meta_path).read()
    meta = json.loads(text)
    meta["records"]["layers.0.up"]["bits"] = 4  # the codes would be read as 4-bit: garbage weights
    open(meta_path, "w").write(json.dumps(meta, indent=1, sort_keys=True))
    with pytest.raises(LowbitError, match=r"lowbit\.json: checksum mismatch: the file was modified after it was saved"):
        Checkpoint.load(path)
    open(meta_path, "w").write(text[: len(text) // 2])
    with pytest.raises(LowbitError, match=r"lowbit\.json is not valid JSON .*truncated or damaged"):
        Checkpoint.load(path)
    open(meta_path, "w").write("[]")
    with pytest.raises(LowbitError, match="not a lowbit checkpoint description"):
        Checkpoint.load(path)


def test_files_saved_before_the_metadata_checksum_still_load(saved, tmp_path):
    path = _copy(saved, tmp_path / "ck")
    meta_path = os.path.join(path, "lowbit.json")
    meta = json.loads(open(meta_path).read())
    del meta["meta_sha256"]
    open(meta_path, "w").write(json.dumps(meta))
    assert set(Checkpoint.load(path).records) == set(Checkpoint.load(saved).records)


# ----------------------------------------------------------------------------- interrupted writes


def big_checkpoint(mb: int, fill: int) -> Checkpoint:
    n = 1024
    rows = mb * 1024 * 1024 // n
    rec = QuantizedLinear(fqn="big", method="rtn", bits=8, in_features=n, out_features=rows, group_size=0,
                          qweight=torch.full((rows, n), fill, dtype=torch.uint8),
                          scales=torch.ones(rows, 1, dtype=torch.float16), seed=None, su=None, sv=None,
                          weight_error=float(fill))
    return Checkpoint(records={"big": rec}, recipe=f"fill-{fill}")


def _writer(path, stall, ready, mb):  # runs in a forked child, which the test SIGKILLs
    real_fsync, real_replace = os.fsync, os.replace
    calls = {"fsync": 0, "replace": 0}

    def stalling(name, real):
        def f(*a):
            calls[name] += 1
            if name == stall and calls[name] == 1:  # fsync: the tensors' journal is written; replace: renamed
                if name == "replace":
                    real(*a)
                ready.set()
                time.sleep(600)
            return real(*a)
        return f

    os.fsync, os.replace = stalling("fsync", real_fsync), stalling("replace", real_replace)
    if stall == "loop":
        ready.set()
        for i in range(10_000):
            big_checkpoint(mb, i % 2 + 1).save(path)
    else:
        big_checkpoint(mb, 2).save(path)


def _kill_writer(path, stall, mb=8, delay=0.0):
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    p = ctx.Process(target=_writer, args=(str(path), stall, ready, mb), daemon=True)
    p.start()
    assert ready.wait(60), "the writer never got to the point where it is killed"
    time.sleep(delay)
    p.kill()  # SIGKILL: no cleanup, no finally blocks
    p.join(10)
    assert p.exitcode == -9


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_writer_killed_mid_save_leaves_the_previous_checkpoint(tmp_path):
    path = big_checkpoint(1, 1).save(tmp_path / "ck")
    before = read(path)
    _kill_writer(path, "fsync")
    assert sorted(os.listdir(path)) == [".lowbit.safetensors.new", "lowbit.json", "lowbit.safetensors"]
    assert read(path) == before  # the half-done save touched nothing
    ck = Checkpoint.load(path)  # loads and verifies its checksums
    assert ck.recipe == "fill-1" and int(ck.records["big"].qweight[0, 0]) == 1
    big_checkpoint(1, 3).save(path)  # the next save replaces the stale journal
    assert sorted(os.listdir(path)) == ["lowbit.json", "lowbit.safetensors"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_writer_killed_between_its_renames_is_rolled_forward_on_load(tmp_path):
    path = big_checkpoint(1, 1).save(tmp_path / "ck")
    _kill_writer(path, "replace", mb=2)
    assert ".lowbit.json.new" in os.listdir(path)  # new tensors, old JSON: the journal completes the save
    ck = Checkpoint.load(path)
    assert ck.recipe == "fill-2" and int(ck.records["big"].qweight[-1, -1]) == 2
    assert sorted(os.listdir(path)) == ["lowbit.json", "lowbit.safetensors"]
    assert Checkpoint.load(path).recipe == "fill-2"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("delay", [0.05, 0.3])
def test_a_writer_killed_at_any_moment_leaves_a_valid_checkpoint(tmp_path, delay):
    path = big_checkpoint(1, 2).save(tmp_path / "ck")
    _kill_writer(path, "loop", mb=16, delay=delay)
    ck = Checkpoint.load(path)
    fill = int(ck.records["big"].qweight[-1, -1])
    assert ck.recipe == f"fill-{fill}" and fill in (1, 2) and bool((ck.records["big"].qweight == fill).all())


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "out" / "model.onnx"
    atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError, match="exporter crashed"):
        with atomic_write(target) as tmp:
            open(tmp, "wb").write(b"half of the new")
            raise RuntimeError("exporter crashed")
    assert target.read_bytes() == b"old" and os.listdir(target.parent) == ["model.onnx"]
    with atomic_write(target) as tmp:
        assert tmp.endswith("-model.onnx") and os.path.dirname(tmp) == str(target.parent)
        open(tmp, "wb").write(b"new")
    assert target.read_bytes() == b"new" and os.listdir(target.parent) == ["model.onnx"]


def test_atomic_outputs_move_side_files_first_and_keep_everything_on_failure(tmp_path):
    target = tmp_path / "model.onnx"
    with atomic_outputs(target) as tmp:
        open(tmp + ".data", "wb").write(b"weights")
        open(tmp, "wb").write(b"graph")
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "model.onnx.data"]
    with pytest.raises(RuntimeError):
        with atomic_outputs(target) as tmp:
            open(tmp + ".data", "wb").write(b"new weights")
            raise RuntimeError("exporter crashed")
    assert (tmp_path / "model.onnx.data").read_bytes() == b"weights" and len(os.listdir(tmp_path)) == 2


# ----------------------------------------------------------------------------- resuming


def _interrupt_at(monkeypatch, prefix):
    """Make quantization fail at the first layer of `prefix`; return the list of layers quantized."""
    calls = []
    real = quantize_weight

    def flaky(fqn, *a, **k):
        calls.append(fqn)
        if fqn.startswith(prefix):
            raise KeyboardInterrupt  # what Ctrl-C raises
        return real(fqn, *a, **k)

    monkeypatch.setattr(core, "quantize_weight", flaky)
    return calls


def _counting(monkeypatch):
    calls = []
    real = quantize_weight
    monkeypatch.setattr(core, "quantize_weight", lambda fqn, *a, **k: (calls.append(fqn), real(fqn, *a, **k))[1])
    return calls


@pytest.mark.parametrize("recipe", ["w3-quip", "w4"])
def test_an_interrupted_run_resumes_after_the_last_finished_block_byte_identically(recipe, tmp_path, monkeypatch):
    net, batches = Net(), data()
    expected = read(lb.quantize(net, recipe, batches, progress=False).save(tmp_path / "uninterrupted"))

    work = tmp_path / "work"
    calls = _interrupt_at(monkeypatch, "layers.2.")
    with pytest.raises(KeyboardInterrupt):
        lb.quantize(net, recipe, batches, progress=False, work_dir=work)
    assert calls[-1] == "layers.2.up" and sorted(os.listdir(work / "units")) == ["layers.0", "layers.1"]

    calls = _counting(monkeypatch)
    ck = lb.quantize(net, recipe, batches, progress=False, work_dir=work)
    assert calls == ["layers.2.up", "layers.2.down", "head"]  # blocks 0 and 1 were not quantized again
    assert read(ck.save(tmp_path / "resumed")) == expected

    calls.clear()  # everything finished: a third run only reads
    assert read(lb.quantize(net, recipe, batches, progress=False, work_dir=work).save(tmp_path / "again")) == expected
    assert calls == []


def test_an_interrupted_fp4_run_resumes_byte_identically(tmp_path, monkeypatch):
    net, batches = Net(blocks=2, d=16, h=24), data(1, d=16, tokens=8)
    expected = read(lb.quantize(net, "fp4", batches, progress=False).save(tmp_path / "uninterrupted"))
    real = quantize_fp4_group

    def flaky(group, *a, **k):
        if any(f.startswith("layers.1.") for f in group):
            raise RuntimeError("out of memory")
        return real(group, *a, **k)

    monkeypatch.setattr(core, "quantize_fp4_group", flaky)
    with pytest.raises(RuntimeError):
        lb.quantize(net, "fp4", batches, progress=False, work_dir=tmp_path / "work")
    monkeypatch.setattr(core, "quantize_fp4_group", real)
    ck = lb.quantize(net, "fp4", batches, progress=False, work_dir=tmp_path / "work")
    assert read(ck.save(tmp_path / "resumed")) == expected  # block 1 saw block 0's W4A4 modules, as before


def test_a_work_dir_of_another_run_is_refused_and_a_damaged_unit_is_redone(tmp_path, monkeypatch, caplog):
    net, batches = Net(blocks=2), data()
    work = tmp_path / "work"
    lb.quantize(net, "w3-quip", batches, progress=False, work_dir=work)
    with pytest.raises(LowbitError, match=r"holds the finished blocks of a different run \(it differs in: "
                                          r"calibration_sha256, recipe\).*delete"):
        lb.quantize(net, "w2-quip", data(seed=1), progress=False, work_dir=work)
    with pytest.raises(LowbitError, match=r"differs in: model_sha256"):
        lb.quantize(Net(blocks=2, h=48), "w3-quip", batches, progress=False, work_dir=work)
    with pytest.raises(LowbitError, match="not supported for the mixed-precision recipe"):
        lb.quantize(net, "3bpw", batches, progress=False, work_dir=work)

    unit = work / "units" / "layers.1" / "lowbit.safetensors"
    unit.write_bytes(unit.read_bytes()[:50])  # e.g. a disk that filled up
    calls = _counting(monkeypatch)
    with caplog.at_level("WARNING", logger="lowbit_compile"):
        ck = lb.quantize(net, "w3-quip", batches, progress=False, work_dir=work)
    assert calls == ["layers.1.up", "layers.1.down"] and "layers.1 in" in caplog.text and "damaged" in caplog.text
    assert read(ck.save(tmp_path / "a")) == read(lb.quantize(net, "w3-quip", batches, progress=False)
                                                 .save(tmp_path / "b"))


# ----------------------------------------------------------------------------- reproducibility


def test_same_inputs_give_byte_identical_checkpoints_and_the_json_says_how_they_were_made(tmp_path):
    net, batches = Net(blocks=2), data()
    overrides = {"re:.*down": "w4-quip", "head": None}
    a = read(lb.quantize(net, "w2-quip", batches, overrides=overrides, seed=7, progress=False).save(tmp_path / "a"))
    b = read(lb.quantize(Net(blocks=2), "w2-quip", [t.clone() for t in batches], overrides=overrides, seed=7,
                         progress=False).save(tmp_path / "b"))
    assert a == b
    meta = json.loads(a["lowbit.json"])
    assert meta["recipe"] == "w2-quip" and meta["seed"] == 7
    spec = meta["meta"]["recipe_spec"]
    assert spec["seed"] == 7 and spec["default"]["bits"] == 2 and spec["default"]["method"] == "quip"
    assert [o[0] for o in spec["overrides"]] == ["re:.*down", "head"] and spec["overrides"][1][1] is None
    assert {"python", "torch", "numpy", "safetensors"} <= set(meta["meta"]["versions"])
    assert len(meta["meta"]["calibration_sha256"]) == 64 and meta["calibration"]["sequential"] is True
    seeds = {f: r["seed"] for f, r in meta["records"].items()}
    assert len(seeds) == 4 and len(set(seeds.values())) == 4  # one recorded transform seed per layer
    c = read(lb.quantize(net, "w2-quip", batches, overrides=overrides, seed=8, progress=False).save(tmp_path / "c"))
    assert c["lowbit.safetensors"] != a["lowbit.safetensors"]


def test_logging_does_not_leak_into_results(tmp_path, caplog):
    """Progress bars and log levels change nothing in the bytes."""
    net, batches = Net(blocks=1), data(1)
    with caplog.at_level(logging.DEBUG, logger="lowbit_compile"):
        a = read(lb.quantize(net, "w3-quip", batches, progress=True).save(tmp_path / "a"))
    b = read(lb.quantize(net, "w3-quip", batches, progress=False).save(tmp_path / "b"))
    assert a == b


def test_atomic_writes_give_files_the_usual_permissions(tmp_path):
    from lowbit_compile.io import atomic_write_bytes

    mask = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "m.pte", b"x")
        plain = tmp_path / "plain"
        plain.write_bytes(b"x")
    finally:
        os.umask(mask)
    assert (tmp_path / "m.pte").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o644
