"""Block fine-tuning (recipes `-ft`, QuIP# sec. 5): once a transformer block's linears are quantized, tune their
continuous parameters so that the block's outputs on the calibration data (its inputs: the quantized model's, from
the tuned blocks before it) match the float model's outputs of that block; the next block is then calibrated and
quantized from the tuned block's outputs. Targets are the float model's own hidden states by default
(FinetuneSettings.target="model": a block also pulls back the error the blocks before it left), or the float block
applied to the quantized model's input (target="block": only this block's own error). On all-MiniLM-L6-v2 at 2 bits
"model" gave cosine 0.912 against 0.909 for "block" (48 steps; 150 steps at a higher rate gave no more).

What is tuned, per E8 record (the codes stay fixed): the per-row scales and the two rotation sign vectors, relaxed to
real values (su, sv: y = sv ⊙ Fᵀ(s ⊙ C · F(su ⊙ x))). All three live in the record, so every target that runs a
record (swap_linears, the backend's reference op and native kernel) applies the tuned values with no code of its
own: scales are stored as float16 as before, su and sv as float32 holding float16 values (counted at 16 bits each
in bits_per_weight once they are no longer signs). A real su also stands for a tuned norm weight in front of the
layer (a per-input-channel factor). Norm weights and linear biases themselves are not tuned: the checkpoint has no
place for them (tried on MiniLM by tuning them in the model: no gain over the scales and signs).

Each parameter is tuned multiplicatively (value = start · (1 + δ), δ from 0) with Adam on the mean squared block
output error relative to the target's mean square, one calibration batch per step drawn by a generator seeded from
the recipe seed and the block name (deterministic: same data and seed, same checkpoint). The tuned values are kept
only if the error over all calibration batches went down.

The calls of each block on its calibration inputs are recorded by forward hooks while `lb.quantize` calibrates (a
BlockTuner open as a context): calibrate_blocks runs each block, float weights still in place, on its stored inputs
right before it quantizes that block; calls made inside a whole-model forward (the first, float pass) are not
recorded. The first block's inputs are the float model's; the tuner carries the float model's hidden states on from
there (the float block run on the float input, `BlockTuner._float_model_targets`).
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass

import torch

from .. import hadamard
from ..calibrate import _first, _hidden, _with_hidden, find_blocks
from .records import E8QuantizedLinear


@dataclass(frozen=True)
class FinetuneSettings:
    steps: int = 48
    lr: float = 2e-3  # on δ: a relative change per step
    signs: bool = True  # relax su and sv to real values (else only the row scales)
    # "model": the float model's own output of the block (the float trajectory, errors of earlier blocks are
    # corrected too); "block": the float block applied to the quantized model's input (only this block's error)
    target: str = "model"


SETTINGS = FinetuneSettings()  # what lb.quantize uses


@dataclass
class BlockResult:
    """The block's output error (mean square relative to the target's, over all calibration batches) before and
    after tuning, and whether the tuned values were kept."""

    block: str
    before: float
    after: float
    kept: bool


class _Tuned(torch.nn.Module):
    """A record with its row scales (and sign vectors) as start · (1 + δ), differentiable in δ."""

    def __init__(self, rec: E8QuantizedLinear, bias: torch.Tensor | None, signs: bool):
        super().__init__()
        self.rec = rec
        codes = rec.e8_format.dequantize(rec.codes()).reshape(rec.out_features, rec.in_features)
        self.register_buffer("codes", codes)  # the rotated weight at scale 1, fixed
        self.s0 = rec.scales.to(torch.float32).reshape(-1)
        self.ds = torch.nn.Parameter(torch.zeros_like(self.s0))
        self.su0, self.sv0 = rec.su, rec.sv
        tune = signs and rec.su is not None and rec.sv is not None
        self.du = torch.nn.Parameter(torch.zeros_like(rec.su)) if tune else None
        self.dv = torch.nn.Parameter(torch.zeros_like(rec.sv)) if tune else None
        self.had_in = hadamard.factor(rec.in_features) if rec.su is not None else None
        self.had_out = hadamard.factor(rec.out_features) if rec.sv is not None else None
        self.bias = None if bias is None else bias.detach().to(torch.float32)

    def values(self):
        """(scales, su, sv) float32 as they are now."""
        su = self.su0 if self.du is None else self.su0 * (1 + self.du)
        sv = self.sv0 if self.dv is None else self.sv0 * (1 + self.dv)
        return self.s0 * (1 + self.ds), su, sv

    def forward(self, x):
        s, su, sv = self.values()
        h = x.to(torch.float32)
        if su is not None:
            h = _rotate(h, su, self.had_in)
        y = torch.nn.functional.linear(h, self.codes) * s
        if sv is not None:
            y = _rotate(y, sv, self.had_out, inverse=True)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)

    def write_back(self) -> None:
        """Store the tuned values in the record: scales float16, su / sv float32 holding float16 values."""
        with torch.no_grad():
            s, su, sv = self.values()
            self.rec.scales = s.reshape(-1, 1).to(torch.float16)
            if self.du is not None:
                self.rec.su = su.to(torch.float16).to(torch.float32)
                self.rec.sv = sv.to(torch.float16).to(torch.float32)


def _rotate(x: torch.Tensor, signs: torch.Tensor, factor: torch.Tensor | None, inverse: bool = False) -> torch.Tensor:
    """hadamard.apply, with the factor applied as one GEMM over all rows (hadamard.apply's batched matmul is slow
    under autograd for large factors)."""
    n = x.shape[-1]
    k = 1 if factor is None else factor.shape[0]
    p = n // k
    if not inverse:
        x = x * signs
    y = hadamard.fwht(x.reshape(-1, k, p))
    if factor is not None:
        f = factor.to(y.dtype)
        y = (y.transpose(1, 2) @ (f if inverse else f.t())).transpose(1, 2)
    y = y.reshape(x.shape) * (1.0 / p**0.5)
    return y * signs if inverse else y


@contextlib.contextmanager
def _swapped(block: torch.nn.Module, prefix: str, modules: dict):
    """Temporarily put `modules` ({fqn: module, or a tensor for a linear's weight}) into `block`."""
    saved = []
    try:
        for fqn, new in modules.items():
            parent_name, _, child = fqn[len(prefix) + 1:].rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            old = getattr(parent, child)
            if isinstance(new, torch.Tensor):
                saved.append((old, "weight", old.weight.data))
                old.weight.data = new.to(old.weight.dtype)
            else:
                saved.append((parent, child, old))
                setattr(parent, child, new)
        yield
    finally:
        for obj, name, old in reversed(saved):
            if name == "weight":
                obj.weight.data = old
            else:
                setattr(obj, name, old)


def _error(block, calls) -> float:
    """Mean square block output error over all calls, relative to the targets' mean square."""
    err = ref = 0.0
    with torch.no_grad():
        for args, kwargs, target in calls:
            out = _first(block(*args, **kwargs)).to(torch.float64)
            err += float((out - target.to(torch.float64)).square().sum())
            ref += float(target.to(torch.float64).square().sum())
    return err / max(ref, 1e-30)


def _seed(seed: int, block: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:finetune:{block}".encode()).digest()[:8], "little") >> 2


def tune_block(block: torch.nn.Module, prefix: str, records: dict, others: dict, calls: list, seed: int = 0,
               settings: FinetuneSettings = FinetuneSettings(), progress: bool = False) -> BlockResult:
    """Tune the E8 `records` ({fqn: record}) of `block` (named `prefix`) in place to the targets of `calls`
    ([(args, kwargs, float output)]); `others` ({fqn: dequantized weight or module}) are the block's other quantized
    linears, as they will run."""
    from tqdm.auto import tqdm

    linears = {f: block.get_submodule(f[len(prefix) + 1:]) for f in records}
    tuned = {f: _Tuned(r, linears[f].bias, settings.signs) for f, r in records.items()}
    params = [p for m in tuned.values() for p in m.parameters()]
    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with _swapped(block, prefix, {**others, **tuned}):
            before = _error(block, calls)
            opt = torch.optim.Adam(params, lr=settings.lr)
            gen = torch.Generator().manual_seed(_seed(seed, prefix))
            for _ in tqdm(range(settings.steps), desc=f"fine-tuning {prefix}", disable=not progress, leave=False):
                args, kwargs, target = calls[int(torch.randint(len(calls), (1,), generator=gen))]
                out = _first(block(*args, **kwargs)).to(torch.float32)
                t = target.to(torch.float32)
                loss = (out - t).square().mean() / t.square().mean().clamp_min(1e-30)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            after = _error(block, calls)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    kept = after < before
    if kept:
        for f, m in tuned.items():
            m.write_back()
            w = linears[f].weight.detach().to(torch.float32)
            r = records[f]
            r.weight_error = float(torch.linalg.vector_norm(r.dequantized_weight() - w)
                                   / torch.linalg.vector_norm(w).clamp_min(1e-30))
            r.proxy_loss = None  # the LDLQ proxy loss no longer describes the tuned weight
    return BlockResult(prefix, before, after if kept else before, kept)


class BlockTuner:
    """Records the blocks' calls while open as a context (see the module docstring) and tunes a block's records
    when asked (`tune`)."""

    def __init__(self, model: torch.nn.Module, seed: int = 0, settings: FinetuneSettings | None = None,
                 progress: bool = False):
        self.model, self.seed, self.settings, self.progress = model, seed, settings or SETTINGS, progress
        name, blocks = find_blocks(model)
        self.blocks = {f"{name}.{i}" if name else str(i): b for i, b in enumerate(blocks)}
        self.calls: dict[str, list] = {}
        self.float_hidden: list | None = None  # the float model's input of the next block, per call
        self.results: list[BlockResult] = []
        self._depth = 0
        self._handles = []

    @classmethod
    def for_recipe(cls, model: torch.nn.Module, recipe, progress: bool = False) -> BlockTuner | None:
        """A tuner when a layer spec of `recipe` asks for fine-tuning (-ft), else None."""
        specs = [recipe.default] + [s for _, s in recipe.overrides]
        return cls(model, recipe.seed, progress=progress) if any(s is not None and s.finetune for s in specs) else None

    def _enter_model(self, *_):
        self._depth += 1

    def _leave_model(self, *_):
        self._depth -= 1

    def _record(self, prefix):
        def hook(mod, args, kwargs, out):
            if self._depth == 0:
                self.calls.setdefault(prefix, []).append((args, dict(kwargs), _first(out).detach()))
        return hook

    def __enter__(self) -> BlockTuner:
        self._depth = 0
        self._handles = [self.model.register_forward_pre_hook(self._enter_model),
                         self.model.register_forward_hook(self._leave_model, always_call=True)]
        self._handles += [b.register_forward_hook(self._record(p), with_kwargs=True) for p, b in self.blocks.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.calls.clear()

    def _float_model_targets(self, block, calls: list) -> list:
        """The calls with the float model's output of `block` as targets: the float block run on the float model's
        input (that of the first block's calls is the float model's; later ones are the outputs kept here)."""
        floats = self.float_hidden if self.float_hidden is not None and len(self.float_hidden) == len(calls) else \
            [_hidden(a, k) for a, k, _ in calls]
        out = []
        with torch.no_grad():
            for (args, kwargs, _), h in zip(calls, floats):
                fa, fk = _with_hidden(args, kwargs, h)
                out.append((args, kwargs, _first(block(*fa, **fk)).detach()))
        self.float_hidden = [t for _, _, t in out]
        return out

    def tune(self, rows, deq: dict, plan: list) -> dict:
        """Tune the E8 records of `rows` (quantize/core Rows of one block) whose spec asks for it, in place; `deq`
        holds what the block's quantized linears run as (dequantized weights or modules). Their `plan` entries get
        "finetune": the block's output error before and after. Returns {fqn: dequantized weight} of the tuned
        records (what the next blocks see): empty when nothing was tuned."""
        records = {r.fqn: r.record for r in rows
                   if r.record is not None and r.spec.finetune and isinstance(r.record, E8QuantizedLinear)}
        prefix = next((p for p in self.blocks if records and all(f.startswith(p + ".") for f in records)), None)
        calls = self.calls.pop(prefix, []) if prefix is not None else []
        self.calls.clear()  # runs of earlier blocks after their quantization
        if not calls:
            return {}
        if self.settings.target == "model":
            calls = self._float_model_targets(self.blocks[prefix], calls)
        others = {f: v for f, v in deq.items() if f not in records}
        res = tune_block(self.blocks[prefix], prefix, records, others, calls, self.seed, self.settings, self.progress)
        self.results.append(res)
        for entry in plan:
            if entry["fqn"] in records:
                entry["finetune"] = {"block": prefix, "error_before": res.before, "error_after": res.after,
                                     "kept": res.kept}
        return {f: r.dequantized_weight() for f, r in records.items()} if res.kept else {}
