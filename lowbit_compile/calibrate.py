"""Calibration: run data through the model and collect, per linear, H = E[x xᵀ] (float64) and per-channel
max |x|; per repeated block, how much the block changes its input (LIM = 1 − cos(in, out)).

Each accumulator also keeps a bounded, deterministic sample of input tokens (`SAMPLE_TOKENS` rows, reservoir
sampling with a fixed seed): the FP4 search evaluates the layer-output error on real activations, which a
second moment alone cannot give (activation rounding is not a function of H).

Summation order: each call's x xᵀ is formed on its own (one float64 GEMM) and added to the running sum, in one
fixed order of the batches (`Shard.order`). That fixed order is what lets several processes split the batches: each
rank forms the products of its own batches, and after an exchange the rank that quantizes the layers reading an input
adds all of that input's products in that order, so the Hessians, and the checkpoint, are the one-process ones byte
for byte.

Streaming, block by block (GPTQ/QuIP practice): the inputs of the first repeated block are captured once;
then each block in turn is run on the stored boundary activations to collect its linears' Hessians, the
caller quantizes those linears, and the block is run again -- with the quantized weights when sequential --
to produce the next block's inputs. Peak memory is one block's weights and Hessians plus the activations at
one block boundary. Linears outside the repeated blocks (a pooler, an untied head) get their statistics from
one float pass over the whole model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

import torch

from .errors import LowbitError

SAMPLE_TOKENS = 512  # rows of input kept per accumulator for the FP4 search
EXCHANGE_BYTES = 256 << 20  # products one rank holds before the ranks exchange them (Shard.every)
SAMPLE_SEED = 0


class HessianAccumulator:
    """Running H = Σ x xᵀ / tokens in float64, max |x| per input channel, and a sample of up to
    `sample_size` input rows (float32), the same rows for the same data in the same order.

    `deferred=True` (calibration split over processes, see `Shard`): `add` only forms the call's x xᵀ and keeps it
    in `pending`; `fold` adds pending products, its own and the other ranks', in the fold order. No sample is kept then
    (a sample needs every token in order; recipes that use it do not split their calibration). An exchange may give
    the Hessian to one rank (`rank`: the one that quantizes the layers reading this input, `sum_on`); the others keep
    max |x| and the rows only."""

    def __init__(self, n: int, name: str = "", sample_size: int = SAMPLE_TOKENS, deferred: bool = False,
                 hessian: bool = True):
        self.n, self.name = n, name
        self.rank: int | None = None  # the one rank that sums the Hessian, when only one does (Shard.exchange)
        # hessian False (the layers reading this input need none, e.g. FP4): max |x| and the sample only
        self.with_hessian = hessian or deferred
        # made at the first product added (`fold`): split over ranks, only on the rank that adds them (Shard.exchange)
        self.sum: torch.Tensor | None = None
        self.absmax = torch.zeros(n, dtype=torch.float32)
        self.tokens = 0
        self.deferred = deferred
        self.sample_size = 0 if deferred else sample_size
        self.pending: list[tuple[torch.Tensor, torch.Tensor, int]] = []  # (x xᵀ, max |x|, rows) per call
        self.rounds: list[tuple[int, list]] = []  # (round, its pending calls) not exchanged yet
        self._sample = torch.empty(0, n, dtype=torch.float32)
        self._gen = torch.Generator().manual_seed(SAMPLE_SEED)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.n)
        finite = torch.isfinite(x).all(dim=0)
        if not bool(finite.all()):
            chans = (~finite).nonzero().flatten().tolist()
            kind = "Inf" if bool(torch.isinf(x[:, chans[0]]).any()) else "NaN"
            raise LowbitError(f"layer {self.name}: calibration activations contain NaN or Inf (input channel "
                              f"{chans[0]} has {kind}; {len(chans)} channel(s) affected: {chans[:8]}); check "
                              f"the calibration data and that the float model runs cleanly on it")
        if self.with_hessian:
            x64 = x.to(torch.float64)
            part = (torch.mm(x64.t(), x64), x.abs().amax(0).float(), x.shape[0])
        else:
            part = (None, x.abs().amax(0).float(), x.shape[0])
        if self.deferred:
            self.pending.append(part)
            return
        if self.sample_size:
            self._add_sample(x.to(torch.float32))
        self.fold([part])

    def fold(self, parts) -> None:
        """Add calls' (x xᵀ, max |x|, rows), in the order given (the fold order)."""
        for xx, amax, rows in parts:
            if xx is not None:
                if self.sum is None:
                    self.sum = torch.zeros(self.n, self.n, dtype=torch.float64)
                self.sum.add_(xx)
            self.absmax = torch.maximum(self.absmax, amax)
            self.tokens += rows

    def _add_sample(self, x: torch.Tensor) -> None:
        """Reservoir sampling (Vitter's algorithm R), vectorized per batch; the generator has a fixed seed."""
        room = self.sample_size - self._sample.shape[0]
        if room > 0:
            self._sample = torch.cat([self._sample, x[:room].clone()])
            x, start = x[room:], self.tokens + room
        else:
            start = self.tokens
        if x.shape[0] == 0 or self.sample_size == 0:
            return
        seen = torch.arange(start, start + x.shape[0], dtype=torch.float64) + 1  # tokens seen incl. this one
        slot = (torch.rand(x.shape[0], generator=self._gen, dtype=torch.float64) * seen).long()
        keep = (slot < self.sample_size).nonzero().flatten().tolist()
        for i in keep:  # in order: a later token replacing the same slot wins, as in the sequential algorithm
            self._sample[slot[i]] = x[i]

    @property
    def sample(self) -> torch.Tensor:
        """float32 (min(tokens, sample_size), n): the sampled input rows."""
        return self._sample

    def hessian(self) -> torch.Tensor | None:
        """Σ x xᵀ / tokens, float64; None when collected without it (`hessian=False`)."""
        if self.tokens == 0:
            raise LowbitError(f"layer {self.name}: no calibration tokens reached this layer")
        if self.rank is not None and self.sum is None:
            raise LowbitError(f"layer {self.name}: its Hessian was summed on rank {self.rank}, the rank that "
                              f"quantizes the layers reading this input (distributed.owners), not on this one")
        return self.sum / self.tokens if self.with_hessian else None

    def sum_on(self, rank: int, here: bool) -> None:
        """Only rank `rank` sums the Hessian; where that is not `here`, drop the sum and keep max |x| and the rows."""
        self.rank = rank
        if not here:
            self.sum = None


@dataclass
class LayerStats:
    # float64 (in, in); None when no layer reading this input needs it (FP4); a callable that raises where another
    # rank summed it (calibration split over processes: Shard.to_owner)
    hessian: torch.Tensor | Callable | None
    absmax: torch.Tensor  # float32 (in,)
    tokens: int
    sample: torch.Tensor | None = None  # float32 (<= SAMPLE_TOKENS, in): sampled input rows
    owner: str = ""  # the linear whose accumulator this is; linears fed the very same tensor share one
    rank: int | None = None  # the rank that summed the Hessian, when only one did (Shard.to_owner)


@dataclass
class CalibrationSummary:
    batches: int = 0
    tokens: int = 0
    sequential: bool = True
    blocks: list[str] = field(default_factory=list)
    lim: dict[str, float] = field(default_factory=dict)  # block fqn -> 1 − cos(in, out)

    def as_dict(self) -> dict:
        return {"batches": self.batches, "tokens": self.tokens, "sequential": self.sequential,
                "blocks": self.blocks, "lim": self.lim}


@dataclass(frozen=True)
class Shard:
    """Which calibration batches this process runs, and the order every process adds their statistics in.

    `order` is the fold order of the batches: their indices, largest first (tokens, then index) when `balance`
    is set (a recipe whose calibration may be split: distributed.shard), else 0, 1, 2, ... Position p of that order
    is in round p // world; within a round the positions go to the ranks in turn, reversed every other round (a
    snake: 0, 1, 1, 0, ... for two ranks), so that each rank gets a fair share of the tokens. Every few rounds
    (`every`) the ranks exchange their batches' products (`exchange`), which are added in position order -- the order
    in which one process runs and adds them with the same `balance`: the Hessians of one process, byte for byte. One
    process runs every batch in that order and exchanges nothing. `over(batches)` fixes the order for a batch list.

    `to_owner` (lb.quantize, whose ranks quantize the linears distributed.assign gives them): an input's products go
    only to the rank that quantizes the layers reading it (distributed.hessian_owners), sent point to point; the
    others keep its max |x| and rows. Without it every rank receives and sums every product."""

    rank: int = 0
    world: int = 1
    balance: bool = False
    order: tuple[int, ...] | None = None
    to_owner: bool = False

    def over(self, batches: list) -> Shard:
        n = len(batches)
        order = (tuple(sorted(range(n), key=lambda b: (-_tokens_of(batches[b]), b))) if self.balance
                 else tuple(range(n)))
        return replace(self, order=order)

    def _owner(self, p: int) -> int:
        j, slot = divmod(p, self.world)
        return slot if j % 2 == 0 else self.world - 1 - slot

    def _position(self, rank: int, j: int) -> int:
        """Where rank's batch of round j is in the order (the snake is its own inverse: slot ↔ rank)."""
        return j * self.world + self._owner(j * self.world + rank)

    def _positions(self) -> list[int]:
        return [p for p in (self._position(self.rank, j) for j in range(self.rounds())) if p < len(self.order)]

    def mine(self, items: list) -> list:
        """This rank's items (one per batch, in the batches' order) in the order it runs them."""
        return [items[self.order[p]] for p in self._positions()]

    def rounds(self) -> int:
        return -(-len(self.order) // self.world)

    def index(self, j: int) -> int:
        """The batch index of this rank's j-th batch (its batch of round j)."""
        return self.order[self._positions()[j]]

    def every(self, linears: Mapping[str, torch.nn.Linear]) -> int:
        """Rounds between two exchanges for these linears: as many as keep one rank's products under
        EXCHANGE_BYTES (at most one x xᵀ per linear and round), so that a rank rarely waits for a slower one's batch
        and memory stays bounded."""
        per_round = sum(8 * lin.in_features ** 2 for lin in linears.values())
        return max(1, EXCHANGE_BYTES // max(per_round, 1))

    def exchange(self, accs: dict[str, HessianAccumulator], share: dict[str, str], j: int, what: str,
                 every: int = 1, linears: Mapping[str, torch.nn.Linear] | None = None) -> None:
        """Close round j; after every `every` rounds and after the last, every rank's products of those rounds added,
        in position order (then call order), to the accumulators of the rank that sums them (`to_owner` and the
        `linears` being calibrated given: the rank that quantizes the layers reading that input; else every rank);
        max |x| and rows to every rank's; accumulators and input sharing that only other ranks met are taken over.
        The small things (which products, max |x|, rows) travel as objects, the float64 products as tensors (no
        pickling): to their owner, sent as soon as the exchange starts and received in the order they are added."""
        if self.world == 1:
            return
        from . import distributed

        for a in accs.values():
            if a.pending:
                a.rounds.append((j, a.pending))
                a.pending = []
        if (j + 1) % every and j != self.rounds() - 1:
            return
        meta = {k: (a.n, [(jj, [(amax, rows) for _, amax, rows in calls]) for jj, calls in a.rounds])
                for k, a in accs.items() if a.rounds}
        gathered = distributed.exchange((dict(share), meta), what)
        for other_share, _ in gathered:
            for fqn, owner in other_share.items():
                share.setdefault(fqn, owner)
        owners = distributed.hessian_owners(linears, share) if self.to_owner and linears is not None else {}
        steps = []  # (key, owner or None for every rank, rank, round index in the rank's list, call, amax, rows)
        for key in sorted({k for _, m in gathered for k in m}):
            calls = []  # (position, call, rank, round index, amax, rows)
            for r, (_, m) in enumerate(gathered):
                n, by_round = m.get(key, (0, []))
                for q, (jj, parts) in enumerate(by_round):
                    p = self._position(r, jj)
                    calls += [(p, i, r, q, amax, rows) for i, (amax, rows) in enumerate(parts)]
                if n and key not in accs:
                    accs[key] = HessianAccumulator(n, key, deferred=True)
            owner = accs[key].rank if accs[key].rank is not None else owners.get(key)  # decided once per input
            if owner is not None:
                accs[key].sum_on(owner, owner == self.rank)
            calls.sort(key=lambda c: c[:2])
            steps += [(key, owner, r, q, i, amax, rows) for _, i, r, q, amax, rows in calls]
        sent = [distributed.isend(accs[key].rounds[q][1][i][0], owner, tag, what)
                for tag, (key, owner, r, q, i, _, _) in enumerate(steps)
                if owner is not None and r == self.rank != owner]
        buffers: dict[int, torch.Tensor] = {}  # one receive buffer per size, reused (added before the next recv)
        for tag, (key, owner, r, q, i, amax, rows) in enumerate(steps):
            acc = accs[key]
            if owner is None:  # every rank sums it
                xx = acc.rounds[q][1][i][0] if r == self.rank else torch.empty(acc.n, acc.n, dtype=torch.float64)
                distributed.broadcast(xx, r, what)
            elif owner != self.rank:
                xx = None
            elif r == self.rank:
                xx = acc.rounds[q][1][i][0]
            else:
                xx = buffers.get(acc.n)
                if xx is None:
                    xx = buffers[acc.n] = torch.empty(acc.n, acc.n, dtype=torch.float64)
                distributed.recv(xx, r, tag, what)
            acc.fold([(xx, amax, rows)])
        distributed.wait(sent, what)
        for a in accs.values():
            a.rounds = []

    def in_order(self, local: list, what: str) -> list:
        """Per-batch values, this rank's in the order it ran its batches, as one list in position order (every
        rank's)."""
        if self.world == 1:
            return list(local)
        from . import distributed

        parts = distributed.exchange(list(local), what)
        return [parts[self._owner(p)][p // self.world] for p in range(len(self.order))]


# ----------------------------------------------------------------------------- calibration inputs


def default_calibration(tokenizer, n_sentences: int = 128, batch_size: int = 16, max_length: int = 128):
    """Batches of English sentences from the standard library's docstrings (no download)."""
    from .data import stdlib_sentences

    if tokenizer is None:
        raise LowbitError("calibration='stdlib' needs the model's tokenizer: pass tokenizer=...")
    return tokenize(tokenizer, stdlib_sentences("calibration", limit=n_sentences), batch_size, max_length)


def tokenize(tokenizer, texts, batch_size: int = 16, max_length: int = 128) -> list[dict]:
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise LowbitError("the calibration text is empty: give at least one non-empty line")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return [dict(tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                           return_tensors="pt")) for i in range(0, len(texts), batch_size)]


def resolve_calibration(calibration, tokenizer):
    """Batches from what lb.quantize accepts as calibration (None when given None)."""
    if isinstance(calibration, str):
        if calibration == "stdlib":
            return default_calibration(tokenizer)
        with open(calibration) as f:  # a text file, one sample per line
            return tokenize(tokenizer, f.read().splitlines()) if tokenizer else _no_tokenizer(calibration)
    if calibration is not None:
        items = list(calibration)
        if items and all(isinstance(t, str) for t in items):
            return tokenize(tokenizer, items) if tokenizer else _no_tokenizer("a list of strings")
        return items
    return None


def _no_tokenizer(what):
    raise LowbitError(f"calibration from {what} needs the model's tokenizer: pass tokenizer=...")


# ----------------------------------------------------------------------------- model structure


def find_blocks(model: torch.nn.Module) -> tuple[str, list[torch.nn.Module]]:
    """The repeated blocks: the nn.ModuleList of same-type children holding the most linears."""
    best, best_count = ("", []), 0
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(c) for c in mod}) != 1:
            continue
        count = sum(isinstance(m, torch.nn.Linear) for c in mod for m in c.modules())
        if count > best_count:
            best, best_count = (name, list(mod)), count
    return best


def named_linears(module: torch.nn.Module, prefix: str = "") -> dict[str, torch.nn.Linear]:
    """{fqn: linear} under `module`, named as in the model when `module` sits at `prefix`; `module` itself is
    named `prefix` when it is a linear (a block of a ModuleList of nn.Linear)."""
    return {".".join(p for p in (prefix, n) if p): m for n, m in module.named_modules()
            if isinstance(m, torch.nn.Linear)}


OUTSIDE_UNIT = "_outside"  # the unit of the linears outside the repeated blocks (a head, a pooler)


def units_of(model: torch.nn.Module) -> dict[str, dict[str, torch.nn.Linear]]:
    """The linears in the order `calibrate_blocks` quantizes them: per repeated block (named by its prefix,
    e.g. "model.layers.0"), then the rest (OUTSIDE_UNIT). Each unit is what a resumed run can skip."""
    blocks_name, blocks = find_blocks(model)
    units = {}
    for i, block in enumerate(blocks):
        prefix = f"{blocks_name}.{i}" if blocks_name else str(i)
        units[prefix] = named_linears(block, prefix)
    in_blocks = {id(m) for b in blocks for m in b.modules()}
    outside = {n: m for n, m in named_linears(model).items() if id(m) not in in_blocks}
    if outside:
        units[OUTSIDE_UNIT] = outside
    return units


# ----------------------------------------------------------------------------- batches


def as_batches(calibration) -> list:
    if calibration is None:
        raise LowbitError("this recipe needs calibration data: pass calibration=[batch, ...] (dicts of tensors "
                          "or input_ids tensors), a list of strings with tokenizer=..., or calibration='stdlib'")
    batches = list(calibration)
    if not batches:
        raise LowbitError("the calibration set is empty: give at least one batch")
    return batches


def _run(model: torch.nn.Module, batch, index: int) -> None:
    if not isinstance(batch, (Mapping, torch.Tensor, tuple, list)):
        raise LowbitError(f"calibration batch {index} is a {type(batch).__name__}: use a dict of tensors, a "
                          f"tensor of input_ids, or a tuple of positional tensors")
    try:
        if isinstance(batch, Mapping):
            model(**batch)
        elif isinstance(batch, torch.Tensor):
            model(batch)
        else:
            model(*batch)
    except (LowbitError, _Captured):
        raise
    except Exception as e:
        raise LowbitError(f"calibration batch {index} does not fit the model ({type(e).__name__}: {e}); give "
                          f"batches shaped like the model's inputs, e.g. the tokenizer's output") from e


def _nonfinite_input(batch, index: int) -> str | None:
    """What is NaN/Inf in the floating-point tensors of a calibration batch, or None."""
    items = (batch.items() if isinstance(batch, Mapping) else enumerate(batch) if isinstance(batch, (tuple, list))
             else [("input", batch)])
    for key, t in items:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
            bad = ~torch.isfinite(t)
            if bool(bad.any()):
                return (f"calibration batch {index}, input {key!r}: {int(bad.sum())} NaN/Inf value(s) (first at index "
                        f"{tuple(bad.nonzero()[0].tolist())})")
    return None


def _check_finite(x, what: str, index: int) -> None:
    if isinstance(x, torch.Tensor) and x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise LowbitError(f"{what}: NaN or Inf in the float model (calibration batch {index}); check the data, the "
                          f"model's weights (norms, embeddings) and its dtype (float16 overflows: try float32)")


def _tokens_of(batch) -> int:
    """Tokens (rows of the model's input) in a batch: input_ids elements, or positions of a float input."""
    t = batch.get("input_ids", next(iter(batch.values()), None)) if isinstance(batch, Mapping) else batch
    if isinstance(t, (tuple, list)):
        t = t[0] if t else None
    if not isinstance(t, torch.Tensor):
        return 0
    if t.is_floating_point() and t.dim() >= 2:  # embeddings or features: the last dimension is the width
        return int(t.numel() // max(t.shape[-1], 1))
    return int(t.numel())


def _is_empty(batch) -> bool:
    """True when the batch holds tensors and every one of them is empty."""
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else [batch]
    tensors = [t for t in items if isinstance(t, torch.Tensor)]
    return bool(tensors) and all(t.numel() == 0 for t in tensors)


@contextlib.contextmanager
def _no_cache(model):
    cfg = getattr(model, "config", None)
    old = getattr(cfg, "use_cache", None)
    if old is not None:
        cfg.use_cache = False
    try:
        yield
    finally:
        if old is not None:
            cfg.use_cache = old


@contextlib.contextmanager
def _observing(root: torch.nn.Module, linears: Mapping[str, torch.nn.Linear], accs: dict[str, HessianAccumulator],
               deferred: bool = False, hessian: bool = True):
    """Forward pre-hooks accumulating each linear's input. Linears fed the very same tensor within one call of
    `root` (q/k/v, gate/up) share one accumulator, decided on the first call. The tensors seen in a call are
    held until the next call starts, so a freed activation's memory cannot be mistaken for a shared input.
    `deferred`: the accumulators keep their products for `Shard.exchange`; `hessian` False: none of these linears
    needs the Hessian (only maxima and the sample are kept)."""
    share: dict[str, str] = {}
    seen: dict[int, tuple[str, torch.Tensor]] = {}

    def new_call(mod, args, kwargs):
        seen.clear()

    def make(fqn, lin):
        def hook(mod, args):
            x = args[0]
            hit = seen.get(id(x))
            owner = hit[0] if hit is not None and hit[1] is x else fqn
            if fqn not in share:
                share[fqn] = owner
            seen[id(x)] = (share[fqn], x)
            if share[fqn] == fqn:
                if fqn not in accs:
                    accs[fqn] = HessianAccumulator(lin.in_features, fqn, deferred=deferred, hessian=hessian)
                accs[fqn].add(x)
        return hook

    hooks = [root.register_forward_pre_hook(new_call, with_kwargs=True)]
    hooks += [lin.register_forward_pre_hook(make(fqn, lin)) for fqn, lin in linears.items()]
    try:
        yield share
    finally:
        for h in hooks:
            h.remove()
        seen.clear()


def _stats(share: Mapping[str, str], accs: Mapping[str, HessianAccumulator]) -> dict[str, LayerStats]:
    """LayerStats per linear. Where another rank sums an input's Hessian, `hessian` is the accumulator's method, which
    says so if called (core.quantize_linears calls a callable Hessian, and only for the layers of its own rank)."""
    by_owner = {o: LayerStats(accs[o].hessian if accs[o].sum is None and accs[o].rank is not None
                              else accs[o].hessian(), accs[o].absmax, accs[o].tokens,
                              None if accs[o].deferred else accs[o].sample, o, accs[o].rank)
                for o in set(share.values())}
    return {fqn: by_owner[owner] for fqn, owner in share.items()}


class _Captured(Exception):
    pass


def _hidden(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args, kwargs, h):
    if args:
        return (h, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _lim(x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    cos = torch.nn.functional.cosine_similarity(x.reshape(-1, x.shape[-1]).double(),
                                                y.reshape(-1, y.shape[-1]).double(), dim=-1)
    return float((1 - cos).sum()), cos.numel()


@contextlib.contextmanager
def _quantized(block: torch.nn.Module, prefix: str, linears: Mapping[str, torch.nn.Linear], deq: Mapping):
    """Temporarily give the block's linears their quantized weights, or replace them by modules. Yields the
    module to run in place of `block`: `block` itself, or the replacement of a block that is itself a linear
    (a ModuleList of nn.Linear), which has no parent inside the block to swap it in."""
    saved_w = {f: linears[f].weight.data for f, v in deq.items() if isinstance(v, torch.Tensor)}
    swapped = []
    run = block
    try:
        for f, v in deq.items():
            if isinstance(v, torch.Tensor):
                linears[f].weight.data = v.to(saved_w[f].dtype)
            elif f == prefix:  # the block is the linear (named_linears lists it under the block's own name)
                run = v
            else:
                parent_name, _, child = f[len(prefix) + 1:].rpartition(".")
                parent = block.get_submodule(parent_name) if parent_name else block
                swapped.append((parent, child, getattr(parent, child)))
                setattr(parent, child, v)
        yield run
    finally:
        for f, w in saved_w.items():
            linears[f].weight.data = w
        for parent, child, old in swapped:
            setattr(parent, child, old)


def calibrate_blocks(
    model: torch.nn.Module,
    calibration: Iterable,
    quantize_layers: Callable[[dict[str, torch.nn.Linear], dict[str, LayerStats]], dict],
    sequential: bool = True,
    progress: bool = True,
    resume: Callable[[str, dict[str, torch.nn.Linear]], dict | None] | None = None,
    loader: Callable[[str], contextlib.AbstractContextManager] | None = None,
    shard: Shard = Shard(),
    needs_hessian: Callable[[str], bool] | None = None,
) -> CalibrationSummary:
    """Drive calibration block by block. `quantize_layers(linears, stats)` quantizes the given linears and
    returns {fqn: dequantized weight, or a module that replaces the linear} (what the rest of the model
    should see when sequential: a module when activations are quantized too, e.g. an FP4 W4A4 layer).

    `resume(unit, linears)`, when given, is asked first for each unit (see `units_of`): a dict (the same
    kind `quantize_layers` returns) means an earlier run finished that unit, so its statistics are not
    collected and `quantize_layers` is not called for it; the block still runs to feed the next one.

    `loader(prefix)`, when given, is a context manager that holds the block's weights only while it is open (the
    blocks stream from disk: stream.py). The float pass then stops at the first block; the float model's own hidden
    states are carried block by block beside the calibrated ones, and the linears outside the blocks are observed
    on a last pass in which every block returns the float model's output of the last block (`_Replay`): the same
    tensors the in-memory float pass gives them.

    `shard` (several processes, see `Shard`): this process runs only its share of the batches, the statistics are
    exchanged every few rounds, and every process calls `quantize_layers` with the statistics of all batches.

    `needs_hessian(fqn)`, when given, says which linears need the Hessian of their input; a pass over linears none of
    which needs it (an FP4 recipe) keeps maxima and samples only, and their LayerStats.hessian is None."""
    from tqdm.auto import tqdm

    def hessian(linears) -> bool:
        return needs_hessian is None or any(needs_hessian(f) for f in linears)

    batches = as_batches(calibration)
    summary = CalibrationSummary(batches=len(batches), tokens=sum(_tokens_of(b) for b in batches),
                                 sequential=sequential)
    if all(_is_empty(b) for b in batches):
        raise LowbitError(f"the {len(batches)} calibration batch(es) hold no tokens (every input is empty); give "
                          f"batches with at least one token each")
    blocks_name, blocks = find_blocks(model)
    in_blocks = {id(m) for b in blocks for m in b.modules()}
    outside = {n: m for n, m in named_linears(model).items() if id(m) not in in_blocks}
    streaming = loader is not None and bool(blocks)
    shard = shard.over(batches)
    deferred = shard.world > 1
    local = shard.mine(batches)

    # pass A: one float pass; capture the first block's inputs and the statistics of linears outside blocks
    stored: list[tuple[tuple, dict]] = []
    accs: dict[str, HessianAccumulator] = {}

    current = [0]  # the batch being run, for error messages
    prefixes = [f"{blocks_name}.{i}" if blocks_name else str(i) for i in range(len(blocks))]

    def capture(mod, args, kwargs):
        _check_finite(_hidden(args, kwargs), f"the input of block {prefixes[0]}", current[0])
        stored.append((args, kwargs))
        if streaming:  # the blocks are on disk: the float pass ends here
            raise _Captured

    def check_output(prefix):
        def hook(mod, args, kwargs, out):
            _check_finite(_first(out), f"the output of block {prefix} (its input is finite)", current[0])
        return hook

    handles = []
    if blocks:
        handles.append(blocks[0].register_forward_pre_hook(capture, with_kwargs=True))
        handles += [b.register_forward_hook(check_output(p), with_kwargs=True) for p, b in zip(prefixes, blocks)]
    try:
        observed = {} if streaming else outside
        every = shard.every(observed)
        with torch.no_grad(), _no_cache(model), _observing(model, observed, accs, deferred, hessian(observed)) as share:
            for j in tqdm(range(shard.rounds()), desc="calibration: float pass", disable=not progress,
                          leave=False):
                if j < len(local):
                    current[0] = i = shard.index(j)
                    try:
                        _run(model, local[j], i)
                    except _Captured:
                        pass
                    except LowbitError as e:  # NaN/Inf met on the way: name the data when it comes from there
                        bad = _nonfinite_input(local[j], i)
                        if bad is None:
                            raise
                        raise LowbitError(f"{bad}; clean the calibration data (it reached {e})") from None
                shard.exchange(accs, share, j, "the statistics of the float pass", every, observed)
    finally:
        for h in handles:
            h.remove()
    outside_stats = _stats(share, accs) if outside and not streaming else {}
    floats, last_outputs = (stored if streaming and outside else None), []  # the float model's hidden states

    lims: dict[str, list] = {}  # block -> this rank's (Σ 1 − cos, rows) per batch, gathered once at the end
    for prefix, block in zip(prefixes, tqdm(blocks, desc="calibration: blocks", disable=not progress)):
        with loader(prefix) if streaming else contextlib.nullcontext():
            stored, lims[prefix] = _calibrate_block(prefix, block, stored, summary, quantize_layers, sequential,
                                                    resume, shard, hessian)
            if floats is not None:
                with torch.no_grad():
                    last_outputs = [block(*a, **k) for a, k in floats]
                for j, out in enumerate(last_outputs):
                    _check_finite(_first(out), f"the output of block {prefix} (its input is finite)", shard.index(j))
                floats = [_with_hidden(a, k, _first(out)) for (a, k), out in zip(floats, last_outputs)]

    if outside and (resume is None or resume(OUTSIDE_UNIT, outside) is None):
        if streaming:
            outside_stats = _replayed_stats(model, blocks_name, last_outputs, local, outside, shard, hessian(outside))
        quantize_layers(outside, outside_stats)
    by_batch = shard.in_order(list(zip(*lims.values())) if lims else [], "the LIM of the blocks")
    for b, prefix in enumerate(lims):
        lim_sum, lim_n = 0.0, 0
        for per_block in by_batch:  # in the fold order, however many processes
            lim_sum, lim_n = lim_sum + per_block[b][0], lim_n + per_block[b][1]
        summary.lim[prefix] = lim_sum / max(lim_n, 1)
    return summary


def _calibrate_block(prefix, block, stored, summary, quantize_layers, sequential, resume, shard=None,
                     hessian=lambda linears: True):
    """One step of calibrate_blocks: the block's statistics, its quantization (unless resumed), the inputs of
    the next block and this rank's LIM terms per batch (returned). `stored` holds this rank's batches (`shard`;
    default: one process, every batch)."""
    shard = shard or Shard().over(stored)
    summary.blocks.append(prefix)
    linears = named_linears(block, prefix)
    deq = resume(prefix, linears) if resume is not None else None
    if deq is None:
        accs = {}
        outputs = []
        with torch.no_grad(), _observing(block, linears, accs, shard.world > 1, hessian(linears)) as share:
            for j in range(shard.rounds()):
                if j < len(stored):
                    args, kwargs = stored[j]
                    outputs.append(_first(block(*args, **kwargs)))
                shard.exchange(accs, share, j, f"the statistics of {prefix}", shard.every(linears), linears)
        deq = quantize_layers(linears, _stats(share, accs))
    elif not (sequential and deq):  # finished earlier: only the block's float outputs are needed
        with torch.no_grad():
            outputs = [_first(block(*a, **k)) for a, k in stored]
    if sequential and deq:
        with _quantized(block, prefix, linears, deq) as run, torch.no_grad():
            outputs = [_first(run(*a, **k)) for a, k in stored]
    lims = [_lim(_hidden(a, k), out) for (a, k), out in zip(stored, outputs)]
    return [_with_hidden(a, k, out) for (a, k), out in zip(stored, outputs)], lims


class _Replay(torch.nn.Module):
    """Stands in for a block on the last pass of a streaming calibration: returns the given output of the batch
    being run (other attributes read through to the block it replaces)."""

    def __init__(self, block: torch.nn.Module, outputs: list, current: list):
        super().__init__()
        object.__setattr__(self, "_block", block)  # not a submodule: its weights are on disk
        self._outputs, self._current = outputs, current

    def forward(self, *args, **kwargs):
        return self._outputs[self._current[0]]

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)


def _replayed_stats(model, blocks_name: str, outputs: list, batches: list, outside: Mapping,
                    shard: Shard | None = None, hessian: bool = True) -> dict[str, LayerStats]:
    """Statistics of the linears outside the blocks, from a pass in which each block returns the float model's
    output of the last block for that batch (`outputs`, computed block by block; this rank's `batches`)."""
    shard = shard or Shard().over(batches)
    layers = model.get_submodule(blocks_name)
    saved, current, accs = list(layers), [0], {}
    try:
        for i, b in enumerate(saved):
            layers[i] = _Replay(b, outputs, current)
        with torch.no_grad(), _no_cache(model), _observing(model, outside, accs, shard.world > 1, hessian) as share:
            for j in range(shard.rounds()):
                if j < len(batches):
                    current[0] = j
                    _run(model, batches[j], shard.index(j))
                shard.exchange(accs, share, j, "the statistics of the linears outside the blocks",
                               shard.every(outside), outside)
    finally:
        for i, b in enumerate(saved):
            layers[i] = b
    return _stats(share, accs)
