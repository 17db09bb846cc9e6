"""Block fine-tuning (recipes `-ft`, QuIP# sec. 5): a transformer block's linears are quantized group by group in the
order they run (a group: the linears that read one input, q/k/v or gate/up), and after each group the block is tuned
on its calibration data to match the float model's outputs of that block: the continuous parameters of the linears
already quantized, and the float weights of those not quantized yet, which then learn to make up for the rounding
before them and are quantized as tuned. Each group's Hessians come from the block as it is when the group's turn
comes (the groups before it quantized, the weights tuned). The next block is then calibrated and quantized from the
tuned block's outputs.

Targets are the float model's own hidden states by default (FinetuneSettings.target="model": a block also pulls back
the error the blocks before it left), or the float block applied to the quantized model's input (target="block":
only this block's own error).

Bias correction (recipe.LayerSpec.bias_correct: the `e8` recipes without -ft; a closed-form cousin of the tuning, after
Nagel et al.'s data-free bias correction, here with data): the groups are quantized in the same order, each from the
Hessians of the block as it is then, and after each group every linear of it that has a bias gets
b = b₀ + m_target − m_now, m_target its mean output in the float model (the float block on the float model's input,
the run that makes the tuning targets), m_now its mean output in the block as it is now (this group quantized, the
groups before it corrected), means over every position of every calibration call, as the Hessians count them. The
quantized layer's mean output on the calibration data is then the float model's, so the error the rounding and the
blocks before left in the mean does not travel on. The bias goes into the record (QuantizedLinear.bias), which every
consumer applies instead of the model's. Linears without a bias (Llama's) are left as they are. On all-MiniLM-L6-v2
`w2-e8` 0.8921 → 0.9043 (benchmark sentences) and 0.8757 → 0.8824 (192 other held-out sentences); the same correction
after quantizing every linear of the block at once from the float block's Hessians gave 0.8992, and correcting only
each layer's own rounding error at its input mean ((W − Ŵ)·E[x], no float-model target) 0.8951 (post hoc).

On all-MiniLM-L6-v2 (bench.quality's cosine on held-out sentences, `w2-e8` 0.892): tuning only the continuous
parameters once the whole block was quantized (the first design) gave 0.910; tuning them after each group 0.913;
also tuning the float weights of the groups still to come 0.928-0.931 (48-96 steps a stage). Most of the gain is the
later weights absorbing the earlier groups' error, as QuIP# reports.

What is tuned, per E8 record (the codes stay fixed): the per-row scales and the two rotation sign vectors, relaxed to
real values (su, sv: y = sv ⊙ Fᵀ(s ⊙ C · F(su ⊙ x))). All three live in the record, so every target that runs a
record (swap_linears, the backend's reference op and native kernel) applies the tuned values with no code of its
own: scales are stored as float16 as before, su and sv as float32 holding float16 values (counted at 16 bits each
in bits_per_weight once they are no longer signs). A real su also stands for a tuned norm weight in front of the
layer (a per-input-channel factor). Norm weights and linear biases themselves are not tuned: the checkpoint has no
place for them (tried on MiniLM by tuning them in the model: no gain over the scales and signs). Float weights are
tuned only for linears the recipe quantizes (their tuned values reach the checkpoint through their codes), on a copy:
the user's model keeps its weights.

Each record parameter is tuned multiplicatively (value = start · (1 + δ), δ from 0), float weights additively, with
Adam on the mean squared block output error relative to the target's mean square, one calibration batch per step
drawn by a generator seeded from the recipe seed, the block name and the stage (deterministic: same data and seed,
same checkpoint). A stage's tuned values are kept only if the error over all calibration batches went down.

The calls of each block on its calibration inputs are recorded by forward hooks while `lb.quantize` calibrates (a
BlockTuner open as a context): calibrate_blocks runs each block, float weights still in place, on its stored inputs
right before it quantizes that block; calls made inside a whole-model forward (the first, float pass) are not
recorded. The first block's inputs are the float model's; the tuner carries the float model's hidden states on from
there (the float block run on the float input, `BlockTuner._float_model_targets`).
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field

import torch

from .. import hadamard
from ..calibrate import _first, _hidden, _observing, _stats, _with_hidden, find_blocks
from ..errors import LowbitError
from .records import E8QuantizedLinear


@dataclass(frozen=True)
class FinetuneSettings:
    steps: int = 64  # per stage (one stage after each group of linears)
    lr: float = 2e-3  # on δ: a relative change per step
    weights: bool = True  # also tune the float weights of the block's linears not quantized yet
    weight_lr: float = 3e-4  # Adam's step on those weights (absolute)
    signs: bool = True  # relax su and sv to real values (else only the row scales)
    # "model": the float model's own output of the block (the float trajectory, errors of earlier blocks are
    # corrected too); "block": the float block applied to the quantized model's input (only this block's error)
    target: str = "model"


SETTINGS = FinetuneSettings()  # what lb.quantize uses


@dataclass
class BlockResult:
    """The block's output error (mean square relative to the target's, over all calibration batches) before and
    after its last stage of tuning (every linear of the block quantized, the earlier stages' tuning in place), and
    whether any stage's values were kept; `stages`: per group of linears, its layers and its stage's errors."""

    block: str
    before: float
    after: float
    kept: bool
    stages: list = field(default_factory=list)

    def entry(self) -> dict:
        """The plan entry's "finetune" value (JSON-ready)."""
        return {"block": self.block, "error_before": self.before, "error_after": self.after, "kept": self.kept,
                "stages": self.stages}


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


def _tune(block: torch.nn.Module, calls: list, tuned: dict, weights: list, settings: FinetuneSettings,
          gen: torch.Generator, desc: str, progress: bool) -> tuple[float, float, bool]:
    """One stage: Adam on the δs of `tuned` ({fqn: _Tuned}, swapped into `block`) and on `weights` (float weights of
    linears still to quantize) against the targets of `calls`. Returns (error before, error after, kept); the
    values go back to where they started when the error did not go down."""
    from tqdm.auto import tqdm

    params = [p for m in tuned.values() for p in m.parameters()]
    every = params + list(weights)
    before = _error(block, calls)
    if not every or settings.steps <= 0:
        return before, before, False
    start = [p.detach().clone() for p in every]
    groups = [{"params": params, "lr": settings.lr}] if params else []
    groups += [{"params": list(weights), "lr": settings.weight_lr}] if weights else []
    for p in every:
        p.requires_grad_(True)
    try:
        opt = torch.optim.Adam(groups)
        for _ in tqdm(range(settings.steps), desc=desc, disable=not progress, leave=False):
            args, kwargs, target = calls[int(torch.randint(len(calls), (1,), generator=gen))]
            out = _first(block(*args, **kwargs)).to(torch.float32)
            t = target.to(torch.float32)
            loss = (out - t).square().mean() / t.square().mean().clamp_min(1e-30)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        for p in weights:
            p.requires_grad_(False)
            p.grad = None
    after = _error(block, calls)
    if after < before:
        return before, after, True
    with torch.no_grad():
        for p, v in zip(every, start):
            p.copy_(v)
    return before, before, False


def _groups(linears: dict, stats: dict) -> list[list[str]]:
    """The block's linears in groups that read one input, in the order they run (calibrate's statistics list the
    linears in the order of their first call, with the linear whose accumulator they share as `owner`); linears
    that never ran come last, together."""
    groups, at = [], {}
    for f, st in stats.items():
        if f not in linears:
            continue
        owner = getattr(st, "owner", "") or f
        if owner not in at:
            at[owner] = len(groups)
            groups.append([])
        groups[at[owner]].append(f)
    rest = [f for f in linears if f not in stats]
    return groups + ([rest] if rest else [])


@contextlib.contextmanager
def _output_sums(modules: dict):
    """While open, forward hooks sum the output rows of `modules` ({fqn: module}) in float64, call by call; yields a
    function giving {fqn: mean output row}: every position of every call, as the Hessians count them (calibrate)."""
    sums = {f: None for f in modules}
    rows = dict.fromkeys(modules, 0)

    def hook(f):
        def fn(mod, args, out):
            y = out.detach().reshape(-1, out.shape[-1]).to(torch.float64)
            part = y.sum(0)
            sums[f] = part if sums[f] is None else sums[f] + part
            rows[f] += y.shape[0]
        return fn

    def means() -> dict:
        missing = [f for f, n in rows.items() if n == 0]
        if missing:
            raise LowbitError(f"bias correction: no calibration token reached {missing[0]} when its block ran; keep "
                              f"the layer in float or use a recipe without bias correction (an -ft recipe)")
        return {f: sums[f] / rows[f] for f in modules}

    handles = [m.register_forward_hook(hook(f)) for f, m in modules.items()]
    try:
        yield means
    finally:
        for h in handles:
            h.remove()


class _Done(Exception):
    pass


@contextlib.contextmanager
def _stopping_after(modules: dict):
    """While open, a run of the block ends (raises _Done) once every module of `modules` has run in it: what comes
    after them is not needed (their statistics or outputs are)."""
    seen: set = set()

    def hook(f):
        def fn(mod, args, out):
            seen.add(f)
            if len(seen) == len(modules):
                seen.clear()
                raise _Done
        return fn

    handles = [m.register_forward_hook(hook(f)) for f, m in modules.items()]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def _run_until(block, args, kwargs, seen: set) -> None:
    seen.clear()
    try:
        block(*args, **kwargs)
    except _Done:
        pass


def _output_means(block: torch.nn.Module, modules: dict, inputs: list) -> dict:
    """{fqn: float64 mean output row of the module} over runs of `block` on `inputs` ((args, kwargs) each), each run
    ended once the modules have run."""
    with _output_sums(modules) as means, _stopping_after(modules) as seen, torch.no_grad():
        for args, kwargs in inputs:
            _run_until(block, args, kwargs, seen)
    return means()


def _block_stats(block: torch.nn.Module, linears: dict, calls: list, stop_after: dict | None = None) -> dict:
    """calibrate's statistics of `linears` from runs of `block` (as it is now) on the inputs of `calls`; with
    `stop_after` ({fqn: module}), each run ends once those have run."""
    accs = {}
    with torch.no_grad(), _observing(block, linears, accs) as share, _stopping_after(stop_after or {}) as seen:
        for args, kwargs, _ in calls:
            _run_until(block, args, kwargs, seen)
    return _stats(share, accs)


class BlockTuner:
    """Records the blocks' calls while open as a context (see the module docstring) and tunes a block's records
    when asked (`quantize_block`)."""

    def __init__(self, model: torch.nn.Module, recipe, settings: FinetuneSettings | None = None,
                 progress: bool = False):
        self.model, self.recipe, self.seed = model, recipe, recipe.seed
        self.settings, self.progress = settings or SETTINGS, progress
        name, blocks = find_blocks(model)
        self.blocks = {f"{name}.{i}" if name else str(i): b for i, b in enumerate(blocks)}
        self.calls: dict[str, list] = {}
        self.float_hidden: list | None = None  # the float model's input of the next block, per call
        self.results: list[BlockResult] = []
        self.carried: set[str] = set()  # blocks the float hidden states were carried through
        self._depth = 0
        self._handles = []

    @classmethod
    def for_recipe(cls, model: torch.nn.Module, recipe, progress: bool = False) -> BlockTuner | None:
        """A tuner when a layer spec of `recipe` asks for fine-tuning (-ft) or bias correction, else None."""
        specs = [recipe.default] + [s for _, s in recipe.overrides]
        wanted = any(s is not None and (s.finetune or s.bias_correct) for s in specs)
        return cls(model, recipe, progress=progress) if wanted else None

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

    def _float_inputs(self, calls: list) -> list:
        """(args, kwargs) of each call with the float model's input of the block (that of the first block's calls is
        the float model's; later ones are the outputs kept here)."""
        floats = self.float_hidden if self.float_hidden is not None and len(self.float_hidden) == len(calls) else \
            [_hidden(a, k) for a, k, _ in calls]
        return [_with_hidden(args, kwargs, h) for (args, kwargs, _), h in zip(calls, floats)]

    def _float_model_targets(self, block, calls: list, means_of: dict | None = None) -> list | tuple[list, dict]:
        """The calls with the float model's output of `block` as targets: the float block run on the float model's
        input (`_float_inputs`). `means_of` ({fqn: module}): also the mean output of those modules in that run,
        returned as a second value."""
        out = []
        with _output_sums(means_of or {}) as means, torch.no_grad():
            for (args, kwargs, _), (fa, fk) in zip(calls, self._float_inputs(calls)):
                out.append((args, kwargs, _first(block(*fa, **fk)).detach()))
        self.float_hidden = [t for _, _, t in out]
        return out if means_of is None else (out, means())

    def _catch_up(self, prefix: str) -> None:
        """Carry the float model's hidden states through the blocks before `prefix` that were not quantized here
        (a resumed run's finished blocks: calibrate ran them, the hooks recorded their inputs), so that a resumed run
        tunes to the same targets as an uninterrupted one."""
        for p, block in self.blocks.items():
            if p == prefix:
                return
            if p not in self.carried and self.calls.get(p):
                if self.settings.target == "model":
                    self._float_model_targets(block, self.calls[p])
                self.carried.add(p)

    def quantize_block(self, linears: dict, stats: dict, quantize) -> tuple[list, dict, dict, dict] | None:
        """Quantize a block's `linears` group by group with tuning stages (-ft) or bias correction between them (the
        module docstring), when they are one block's and a layer of it asks for either; else None (the caller
        quantizes them as usual).

        `stats`: calibrate's statistics of the block as it runs in float (those of the first group); `quantize(linears,
        stats) -> (rows, deq)` quantizes some of them (quantize/core rows, and what the rest of the model runs for
        each: a dequantized weight or a module). Returns (rows, deq, stats, plan): all the block's rows, what the
        next blocks see (tuned records rebuilt), the statistics each layer was quantized with, and per layer what its
        plan entry adds ("finetune" for a tuned record, "bias_correction" for a corrected one)."""
        prefix = next((p for p in self.blocks if linears and all(f.startswith(p + ".") for f in linears)), None)
        if prefix is None:
            return None
        self._catch_up(prefix)
        calls = self.calls.pop(prefix, [])
        self.calls.clear()  # runs of earlier blocks after their quantization
        self.carried.add(prefix)
        block = self.blocks[prefix]
        specs = {f: self.recipe.spec_for(f)[0] for f in linears}
        fixing = {f: linears[f] for f, sp in specs.items()
                  if sp is not None and sp.bias_correct and linears[f].bias is not None}
        # the mean output each corrected linear should have: the float model's (target "model": the float block on
        # the float model's input, the run that also makes the tuning targets) or the float block's on this block's
        # input (target "block")
        goal = {}
        if calls and self.settings.target == "model":
            calls, goal = self._float_model_targets(block, calls, fixing)
        elif calls and fixing:
            goal = _output_means(block, fixing, [(a, k) for a, k, _ in calls])
        if not calls or not any(s is not None and (s.finetune or s.bias_correct) for s in specs.values()):
            return None
        if not any(s is not None and s.finetune for s in specs.values()):
            return self._bias_corrected_block(block, prefix, linears, stats, quantize, goal, calls)
        groups = _groups(linears, stats)
        rows_all, deq_all, used, tuned, stages, plan = [], {}, {}, {}, [], {}
        originals = {f: lin.weight.data for f, lin in linears.items()}
        grads = {p: p.requires_grad for p in block.parameters()}
        try:
            for p in grads:
                p.requires_grad_(False)
            for lin in linears.values():  # tuned on a copy: the user's model keeps its weights
                lin.weight.data = lin.weight.data.clone()
            with contextlib.ExitStack() as swaps:
                for k, group in enumerate(groups):
                    members = {f: linears[f] for f in group}
                    st = {f: stats[f] for f in group if f in stats} if k == 0 else _block_stats(block, members, calls)
                    rows, deq = quantize(members, st)
                    rows_all += rows
                    used.update(st)
                    swap = {}
                    for r in rows:
                        if r.record is None:
                            continue
                        if r.spec.finetune and isinstance(r.record, E8QuantizedLinear):
                            tuned[r.fqn] = swap[r.fqn] = _Tuned(r.record, linears[r.fqn].bias, self.settings.signs)
                        elif r.fqn in deq:
                            swap[r.fqn] = deq[r.fqn]
                    deq_all.update(deq)
                    swaps.enter_context(_swapped(block, prefix, swap))
                    fix = [r for r in rows if r.record is not None and r.fqn in goal and r.fqn not in tuned]
                    if fix:
                        self._correct_biases(block, prefix, {r.fqn: r.record for r in fix}, goal, calls, linears,
                                             swaps, deq_all, plan)
                    later = [linears[f].weight for g in groups[k + 1:] for f in g
                             if self.settings.weights and specs[f] is not None and specs[f].finetune]
                    if not tuned and not later:
                        continue  # nothing to tune (bias correction only)
                    gen = torch.Generator().manual_seed(_seed(self.seed, f"{prefix}:{k}"))
                    desc = f"fine-tuning {prefix} ({k + 1}/{len(groups)})"
                    before, after, kept = _tune(block, calls, tuned, later, self.settings, gen, desc, self.progress)
                    stages.append({"layers": list(group), "error_before": before, "error_after": after, "kept": kept})
        finally:
            for f, lin in linears.items():
                lin.weight.data = originals[f]
            for p, flag in grads.items():
                p.requires_grad_(flag)
        if stages:
            res = BlockResult(prefix, stages[-1]["error_before"], stages[-1]["error_after"],
                              any(s["kept"] for s in stages), stages)
            self.results.append(res)
            plan.update({f: {"finetune": res.entry()} for f in tuned})
        for f, m in tuned.items():
            if any(bool(p.detach().abs().max() > 0) for p in m.parameters()):
                m.write_back()
                r = m.rec
                r.weight_error = float(torch.linalg.vector_norm(r.dequantized_weight() - originals[f].float())
                                       / torch.linalg.vector_norm(originals[f].float()).clamp_min(1e-30))
                r.proxy_loss = None  # the LDLQ proxy loss no longer describes the tuned weight
            deq_all[f] = m.rec.dequantized_weight()
        return rows_all, deq_all, used, plan

    def _bias_corrected_block(self, block, prefix: str, linears: dict, stats: dict, quantize, goal: dict,
                              calls: list) -> tuple[list, dict, dict, dict]:
        """quantize_block without fine-tuning: the groups quantized in the order they run, each from the statistics
        of the block as it is then (the groups before it quantized and corrected; the first group's are the float
        block's), and each group's biases corrected right after it. (All linears quantized at once from the float
        block's statistics, then corrected: 0.8992 on all-MiniLM-L6-v2 `w2-e8` against 0.9043 this way.)"""
        rows_all, deq_all, used, plan = [], {}, {}, {}
        with contextlib.ExitStack() as swaps:
            for k, group in enumerate(_groups(linears, stats)):
                members = {f: linears[f] for f in group}
                st = {f: stats[f] for f in group if f in stats} if k == 0 else \
                    _block_stats(block, members, calls, stop_after=members)
                rows, deq = quantize(members, st)
                rows_all += rows
                used.update(st)
                deq_all.update(deq)
                records = {r.fqn: r.record for r in rows if r.record is not None}
                swaps.enter_context(_swapped(block, prefix, {f: deq[f] for f in records if f in deq}))
                fix = {f: rec for f, rec in records.items() if f in goal}
                if fix:
                    self._correct_biases(block, prefix, fix, goal, calls, linears, swaps, deq_all, plan)
        return rows_all, deq_all, used, plan

    def _correct_biases(self, block, prefix: str, records: dict, goal: dict, calls: list, linears: dict,
                        swaps: contextlib.ExitStack, deq: dict, plan: dict) -> None:
        """Bias correction of one group: each record gets bias = model bias + goal mean − the mean output the layer
        has now (quantized, the groups before it corrected) on the block's calibration inputs. The corrected layers
        (nn.DequantizedLinear) go into the block for the rest of `swaps` and into `deq` (what the next blocks see),
        their plan entries into `plan`."""
        from ..nn import DequantizedLinear

        now = _output_means(block, {f: block.get_submodule(f[len(prefix) + 1:]) for f in records},
                            [(a, k) for a, k, _ in calls])
        for f, rec in records.items():
            b0 = linears[f].bias.detach().to(torch.float64)
            shift = goal[f] - now[f]
            rec.bias = (b0 + shift).to(torch.float32)
            plan[f] = {"bias_correction": {"mean_shift_rms": float(shift.square().mean().sqrt()),
                                           "bias_rms": float(b0.square().mean().sqrt())}}
            deq[f] = DequantizedLinear(rec.dequantized_weight(), rec.bias)
        swaps.enter_context(_swapped(block, prefix, {f: deq[f] for f in records}))
