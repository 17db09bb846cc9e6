"""lb.quantize over several processes (torch.distributed, started by torchrun): the linears of each unit are split
over the ranks, each rank quantizes its own share, and the records are exchanged so that every rank goes on with
the whole block quantized (sequential calibration needs it). The result is byte-identical to one process: each
record is made by the same function from the same weight, Hessian and seed, wherever it is made.

    torchrun --nproc-per-node 2 -m lowbit_compile.cli quantize MODEL_DIR --recipe w2-quip -o out/
    lowbit quantize MODEL_DIR --recipe w2-quip -o out/ --nproc 2          # the same: runs torchrun for you

    # in a script started by torchrun
    from lowbit_compile import distributed
    distributed.init()                      # gloo on CPU, NCCL when CUDA is there; a no-op for one process
    ckpt = lb.quantize(model, "w2-quip", batches)
    if distributed.rank() == 0:
        ckpt.save("out/")

The calibration batches are split too (calibrate.Shard): largest first, dealt out to the ranks in turn; every few
rounds the ranks exchange the x xᵀ products of their batches, which every rank adds in that order -- the order one
process runs and adds them in, so the Hessians are the same bytes. Not split: recipes with FP4
layers (their search reads a sample of every layer's input tokens, drawn in token order) and block fine-tuning (-ft:
each block is fitted to the outputs of all batches); there every rank runs every batch. FP4 layers that share an
input (one group) stay on one rank. Only rank 0 logs, shows progress and writes the work_dir; a resumed run reads it
on every rank, so several machines need it on a shared filesystem. A rank that dies ends the others: torchrun stops
the group, and a rank waiting in an exchange fails with a LowbitError naming the unit (after `timeout`).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os

import torch

from .errors import LowbitError

log = logging.getLogger("lowbit_compile")
TIMEOUT = datetime.timedelta(minutes=30)  # a rank waiting longer than this for the others gives up


def init(backend: str | None = None, timeout: datetime.timedelta = TIMEOUT) -> bool:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment); True when
    there is more than one process. Ranks other than 0 log errors only."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend, timeout=timeout)
    if dist.get_rank() != 0:
        log.setLevel(logging.ERROR)
    return dist.get_world_size() > 1


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialized process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank() -> int:
    return world()[0]


def assign(layers: list, world_size: int) -> dict[str, int]:
    """{group key: rank}: the layers' groups (an FP4 group, else the layer itself) given to ranks by their cost
    (out x in^2, the order of LDLQ), largest first to the least loaded rank; ties broken by order, so every rank
    computes the same assignment."""
    cost: dict[str, int] = {}
    for layer in layers:
        key = layer.group or layer.fqn
        out_f, in_f = layer.shape
        cost[key] = cost.get(key, 0) + out_f * in_f * in_f
    load = [0] * world_size
    owner = {}
    for key in sorted(cost, key=lambda k: -cost[k]):  # sorted() is stable: equal costs keep the layers' order
        r = min(range(world_size), key=lambda i: (load[i], i))
        owner[key] = r
        load[r] += cost[key]
    return owner


def owners(layers: list, world_size: int) -> dict[str, int]:
    """`assign`, except that a group whose Hessian only one rank summed (calibrate.LayerStats.rank: the calibration
    was split with Shard.to_owner) goes to that rank: a layer is quantized where its Hessian is."""
    owner = assign(layers, world_size)
    for la in layers:
        r = None if callable(la.stats) else getattr(la.stats, "rank", None)
        if r is not None:
            owner[la.group or la.fqn] = r
    return owner


def hessian_owners(linears, share) -> dict[str, int]:
    """{input key: rank} while calibrating `linears` (a unit that lb.quantize quantizes as one) split over the ranks:
    the rank `assign` gives the layers reading each input, as lb.quantize will group them (`share`: linear -> the key
    of the input it reads, calibrate._observing)."""
    from .quantize.core import Layer

    layers = [Layer(f, None, None, share.get(f, f), (lin.out_features, lin.in_features)) for f, lin in linears.items()]
    return assign(layers, world()[1])


def exchange(obj, what: str) -> list:
    """Every rank's `obj`, in rank order (all_gather_object); a rank that died or timed out makes it a LowbitError
    naming `what` was being exchanged."""
    import torch.distributed as dist

    gathered: list = [None] * world()[1]
    with _failing(what):
        dist.all_gather_object(gathered, obj)
    return gathered


def broadcast(tensor: torch.Tensor, src: int, what: str) -> None:
    """`tensor` of rank `src` copied into every rank's `tensor` (same shape and dtype everywhere)."""
    import torch.distributed as dist

    with _failing(what):
        dist.broadcast(tensor, src)


def isend(tensor: torch.Tensor, dst: int, tag: int, what: str):
    """Start sending `tensor` to rank `dst` (keep it unchanged until `wait`); the handle for `wait`."""
    import torch.distributed as dist

    with _failing(what):
        return dist.isend(tensor, dst, tag=tag)


def recv(tensor: torch.Tensor, src: int, tag: int, what: str) -> torch.Tensor:
    """`tensor` filled with what rank `src` sent with `tag`."""
    import torch.distributed as dist

    with _failing(what):
        dist.recv(tensor, src, tag=tag)
    return tensor


def wait(handles: list, what: str) -> None:
    """Until the sends `handles` (from `isend`) are done."""
    with _failing(what):
        for h in handles:
            h.wait()


@contextlib.contextmanager
def _failing(what: str):
    try:
        yield
    except RuntimeError as e:  # a rank died or timed out
        raise LowbitError(f"rank {rank()}: the exchange of {what} failed, another rank stopped "
                          f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); run again with the same "
                          f"work_dir to resume from the last finished block") from e


def shard(recipe, finetune: bool = False):
    """calibrate.Shard of this process: its share of the calibration batches, largest first and dealt out in turn
    (balanced tokens per rank; one process runs all of them in that order), or all of them in their order on every
    rank (a recipe with FP4 layers, whose search needs a sample of every layer's input tokens in order; block
    fine-tuning, which fits each block to the outputs of every batch)."""
    from .calibrate import Shard

    r, n = world()
    specs = [recipe.default] + [s for _, s in recipe.overrides]
    if finetune or any(s is not None and s.method == "fp4" for s in specs):
        return Shard()
    # in one process too: the order of the sums is the same for any N; each input's products to the rank that
    # quantizes the layers reading it (distributed.owners), as lb.quantize, the only caller, does
    return Shard(r, n, balance=True, to_owner=True)


def replacements(layers, records: dict, make, *, is_tensor, unit: str = "", ready: dict | None = None) -> dict:
    """{fqn: make(fqn, record)} for the layers that have a record, on every rank. With several ranks, a record for
    which `is_tensor(record)` holds (a dequantized float32 weight of the layer's shape) is made by the rank that
    quantized the layer (`owners`; or taken from `ready`, where that rank made it already) and sent to the others, one
    broadcast per rank of all it made: the same bytes as made anywhere, made once. Others are made on every rank."""
    r, n = world()
    if n == 1:
        return {la.fqn: make(la.fqn, records[la.fqn]) for la in layers if la.fqn in records}
    owner = owners(list(layers), n)
    out, by_src = {}, {}
    for la in layers:
        rec = records.get(la.fqn)
        if rec is None:
            continue
        if is_tensor(rec):
            by_src.setdefault(owner[la.group or la.fqn], []).append(la)
        else:
            out[la.fqn] = make(la.fqn, rec)
    ready = ready or {}
    for src in sorted(by_src):
        mine = by_src[src]
        sizes = [la.shape[0] * la.shape[1] for la in mine]
        flat = (torch.cat([(ready[la.fqn] if la.fqn in ready else make(la.fqn, records[la.fqn])).reshape(-1)
                           for la in mine]) if src == r
                else torch.empty(sum(sizes), dtype=torch.float32))
        broadcast(flat, src, f"the quantized weights of {', '.join(la.fqn for la in mine[:3])}"
                             + (", ..." if len(mine) > 3 else "") + (f" ({unit})" if unit else ""))
        out.update({la.fqn: t.view(la.shape) for la, t in zip(mine, flat.split(sizes))})
    return out


def quantize_linears(layers, recipe, *, on_record=None, unit: str = "", prepare=None):
    """quantize.core.quantize_linears with the layers split over the ranks (see the module docstring): the same rows
    and records on every rank, `on_record` called for every layer in the given order. `prepare(fqn, record)`, with
    several ranks, is called for this rank's own records before they are exchanged: work on them (the weight the next
    block needs, `replacements(ready=...)`) then fills the time a rank with less to quantize waits for the others."""
    from .quantize import core

    layers = list(layers)
    r, n = world()
    if n == 1:
        return core.quantize_linears(layers, recipe, on_record=on_record)
    owner = owners(layers, n)
    mine = core.quantize_linears([la for la in layers if owner[la.group or la.fqn] == r], recipe)
    if prepare is not None:
        for row in mine:
            if row.record is not None:
                prepare(row.fqn, row.record)
    records = {}
    for part in exchange({row.fqn: row.record for row in mine}, f"the records of {unit or 'a unit'}"):
        records.update(part)
    return core.quantize_linears(layers, recipe, cache=lambda w, key, make: (records.get(key[0]), False),
                                 on_record=on_record)
