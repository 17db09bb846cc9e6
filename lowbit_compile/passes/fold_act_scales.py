"""fold_act_scales: fold the per-channel activation exponents of FP4 linears into the producer of their input.

`lowbit::fp4_linear(x, ..., act_shift=k, ...)` multiplies x by 2**k before rounding the activations per
tensor. Where x is made by an op that is linear per channel with a constant per-channel factor, that factor
absorbs 2**k exactly (a power of two commutes with every float rounding, barring overflow), and the op then
gets act_shift=None: the run-time quantizer is purely per tensor.

- Norm: x = layer_norm(t, (C,), w, b) | rms_norm(t, (C,), w) | w * t with w a constant vector (Hugging
  Face's RMSNorm ends in `self.weight * hidden`), possibly through dtype casts, `contiguous` or eval-mode
  dropout. A copy of the norm with w·2**k (and b·2**k) as new graph constants feeds the FP4 consumers; the
  original keeps serving every other user (BERT's residual stream). Consumers with the same k share one
  copy (lb.quantize gives all consumers of one input the same k); each different k gets its own copy.
- FP4 linear rows: x comes from another `lowbit::fp4_linear` P only through ops that are linear in P's
  output channel by channel -- views, transposes, the value path of attention, the gate product of a gated
  MLP (v_proj -> o_proj, up_proj -> down_proj) -- and P's output feeds nothing else: P's row scales (and
  bias) take 2**k of the channel each row becomes. Which consumer channel a row becomes is found by running
  the path on a tensor of row indices (GQA head sharing included); when channels made from one row ask for
  different k, nothing is folded.
- Anything else (a float producer, a norm without affine weight, a residual sum, a graph input, a path
  whose values are also returned, e.g. a KV cache): the shift stays at run time, and `notes` says why.

Where: the backend runs it on the Dynamo graph after rewrite_linears. It also works on the exported graph
of the swapped model (`ep.module()`, parameters as get_attr; tested), but the exporters do not run it: they swap
modules for their runtime forms before capture (export/decompose.py), so their graphs hold no fp4_linear node,
and an exported W4A4 layer keeps the exact run-time shift (nn.py says what folding there would need).
Folded tensors are new buffers `_lowbit_fold_*` of the GraphModule: the model's own
parameters (in the Dynamo graph, the user's nn.Parameters) are never modified.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Mapping

import torch

from ..kernels.specs import FP4_LINEAR
from .base import FOLD, QUANTIZED_TAG, PassBase, PassResult, add_constant, get_attr_tensor, source_to_fqn

aten = torch.ops.aten

_LAYER_NORMS = (torch.nn.functional.layer_norm, torch.layer_norm, aten.layer_norm.default)
_RMS_NORMS = tuple(f for f in (getattr(torch.nn.functional, "rms_norm", None), getattr(torch, "rms_norm", None),
                               getattr(aten, "rms_norm", None) and aten.rms_norm.default) if f is not None)
_MULS = (operator.mul, torch.mul, aten.mul.Tensor)
_SDPA = (torch.nn.functional.scaled_dot_product_attention, aten.scaled_dot_product_attention.default)
_MATMULS = (torch.matmul, operator.matmul, aten.matmul.default)
_DROPOUTS = (torch.nn.functional.dropout, torch.dropout, aten.dropout.default)
# Same values, same layout (the last dimension is still the channel).
_IDENTITY_METHODS = ("contiguous", "clone", "float", "to", "type_as")
_IDENTITY_FUNCS = (aten.clone.default, aten.contiguous.default, aten._to_copy.default, aten.alias.default)
# Shape ops: values unchanged, channels may move; followed exactly by running them on row indices.
_SHAPE_METHODS = ("view", "reshape", "transpose", "permute", "unsqueeze", "expand", "flatten", "contiguous",
                  "clone", "float", "to")
_SHAPE_FUNCS = (torch.reshape, torch.transpose, torch.permute, torch.unsqueeze, torch.flatten,
                aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
                aten.permute.default, aten.unsqueeze.default, aten.expand.default, aten.clone.default,
                aten.contiguous.default, aten._to_copy.default, aten.alias.default)


def _is_basic_getitem(n: torch.fx.Node) -> bool:
    """x[...] with slices, None, Ellipsis and ints only (e.g. repeat_kv's x[:, :, None]): a view of x."""
    if n.op != "call_function" or n.target is not operator.getitem:
        return False
    idx = n.args[1]
    items = idx if isinstance(idx, tuple) else (idx,)
    return all(i is None or i is Ellipsis or isinstance(i, (slice, int)) for i in items) and all(
        not isinstance(getattr(i, a, None), torch.fx.Node) for i in items if isinstance(i, slice)
        for a in ("start", "stop", "step"))


class _NoFold(Exception):
    """Why a consumer keeps its run-time shift."""


class _NoProducer(_NoFold):
    """No FP4 linear reaches the input through per-channel linear ops."""


def _is_fp4(n) -> bool:
    return FP4_LINEAR.is_call(n)


def _is_identity(n: torch.fx.Node) -> bool:
    """Ops that return their first argument's values unchanged, in the same layout."""
    if n.op == "call_method" and n.target in _IDENTITY_METHODS:
        # .to(dtype) / .to(device) / .float(): no shape argument can appear in these
        return n.target != "to" or all(not isinstance(a, (torch.Size, tuple, list)) for a in n.args[1:])
    if n.op != "call_function":
        return False
    if n.target in _IDENTITY_FUNCS:
        return True
    if n.target in _DROPOUTS:  # dropout(x, p, training[, inplace]) is the identity when not training
        training = n.args[2] if len(n.args) > 2 else n.kwargs.get("training", n.kwargs.get("train", True))
        return training is False
    return False


def _fresh_name(gm: torch.fx.GraphModule, base: str) -> str:
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name


def _layer(n: torch.fx.Node) -> str:
    """The layer an fp4_linear node computes: rewrite_linears' tag, else its module (export graphs)."""
    if QUANTIZED_TAG in n.meta:
        return n.meta[QUANTIZED_TAG]
    stack = n.meta.get("nn_module_stack")
    if stack:
        return source_to_fqn(list(stack.values())[-1][0])
    return n.name


def _val(n):
    return n.meta.get("val", n.meta.get("example_value")) if isinstance(n, torch.fx.Node) else None


def _hint(v):
    """A concrete int for an int or SymInt (its size hint: the example's value; adds no guard)."""
    if isinstance(v, torch.SymInt):
        from torch.fx.experimental import symbolic_shapes

        if hasattr(symbolic_shapes, "optimization_hint"):
            return int(symbolic_shapes.optimization_hint(v))
        return int(symbolic_shapes.hint_int(v))  # older torch
    return int(v)


def _concrete_shape(n: torch.fx.Node) -> tuple[int, ...]:
    """Shape from meta["val"] (Dynamo, export) or meta["tensor_meta"] (torch.fx ShapeProp)."""
    v = _val(n)
    shape = v.shape if isinstance(v, torch.Tensor) else getattr(n.meta.get("tensor_meta"), "shape", None)
    if shape is None:
        raise _NoFold(f"node {n.name} has no shape metadata (run ShapeProp on a plain FX trace)")
    return tuple(_hint(s) for s in shape)


def _depends_on(node, target: torch.fx.Node) -> bool:
    """Whether `target` is `node` or one of its ancestors."""
    if not isinstance(node, torch.fx.Node):
        return False
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n is target:
            return True
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return False


class FoldActScales(PassBase):
    """Fold FP4 activation exponents into producers (see the module docstring).

    `constants` maps placeholder names to their values for graphs whose parameters are placeholders but
    carry no Dynamo example (a torch.export graph signature); get_attr constants and Dynamo parameter
    placeholders are found without it. After a call, `notes` lists what was folded where, and why each
    remaining run-time shift stayed.
    """

    def __init__(self, constants: Mapping[str, torch.Tensor] | None = None):
        super().__init__()
        self.constants = dict(constants or {})
        self.notes: list[str] = []
        self.folded: dict[str, str] = {}  # consumer layer -> "norm <node>" | "rows of <layer>"
        self.kept: dict[str, str] = {}  # consumer layer -> why the shift stays at run time

    # -------------------------------------------------------------------------------- constants

    def _const(self, gm: torch.fx.GraphModule, n) -> torch.Tensor | None:
        if not isinstance(n, torch.fx.Node):
            return None
        if n.op == "get_attr":
            return get_attr_tensor(gm, n)
        if n.op == "placeholder":
            if n.name in self.constants:
                return self.constants[n.name]
            ga = n.meta.get("grapharg")
            ex = getattr(ga, "example", None) if ga is not None else None
            if isinstance(ex, torch.nn.Parameter):
                return ex
        return None

    @staticmethod
    def _scaled(t: torch.Tensor, mult: torch.Tensor, what: str) -> torch.Tensor:
        """t * mult (powers of two) in t's dtype, refusing anything that is not exact (overflow)."""
        exact = t.detach().to(torch.float64) * mult.to(torch.float64)
        out = exact.to(t.dtype)
        if not bool(torch.isfinite(out).all()) or not torch.equal(out.to(torch.float64), exact):
            raise _NoFold(f"{what} times 2**k overflows {t.dtype}")
        return out

    # -------------------------------------------------------------------------------- analysis

    def _norm_producer(self, gm, x: torch.fx.Node, channels: int):
        """(norm node, identity chain from it to x, {arg position: constant}) or raise _NoFold."""
        chain = []
        n = x
        while isinstance(n, torch.fx.Node) and _is_identity(n):
            chain.append(n)
            n = n.args[0]
        chain.reverse()
        if not isinstance(n, torch.fx.Node) or n.op not in ("call_function", "call_method"):
            raise _NoFold("the input is not computed in this graph")
        target = n.target
        if n.op == "call_function" and target in _LAYER_NORMS + _RMS_NORMS:
            is_ln = target in _LAYER_NORMS
            shape = n.args[1] if len(n.args) > 1 else n.kwargs.get("normalized_shape")
            if shape is None or len(tuple(shape)) != 1:
                raise _NoFold(f"norm {n.name} normalizes over more than the channel dimension")
            w_pos = (2, "weight")
            positions = [w_pos] + ([(3, "bias")] if is_ln else [])
            consts = {}
            for pos, key in positions:
                arg = n.args[pos] if len(n.args) > pos else n.kwargs.get(key)
                if arg is None:
                    if key == "weight":
                        raise _NoFold(f"norm {n.name} has no affine weight")
                    continue
                val = self._const(gm, arg)
                if val is None or tuple(val.shape) != (channels,):
                    raise _NoFold(f"the {key} of norm {n.name} is not a constant vector of {channels}")
                consts[(pos, key)] = val
            return n, chain, consts
        if (n.op == "call_function" and target in _MULS) or (n.op == "call_method" and target == "mul"):
            a, b = (n.args + (None, None))[:2]
            for pos, arg in ((0, a), (1, b)):
                val = self._const(gm, arg)
                if val is not None and val.dim() >= 1 and val.shape[-1] == channels and val.numel() == channels:
                    other = b if pos == 0 else a
                    if isinstance(other, torch.fx.Node) and self._const(gm, other) is None:
                        return n, chain, {(pos, "scale"): val}
            raise _NoFold(f"{n.name} multiplies by no constant per-channel vector")
        raise _NoFold(f"the input comes from {getattr(target, '__name__', target)} ({n.name}), not from a norm "
                      f"or an FP4 linear")

    def _row_producer(self, x: torch.fx.Node):
        """(P, path) with P a lowbit::fp4_linear and path the nodes from P's user to x, or raise _NoFold."""

        def walk(n, depth=0):
            if depth > 32 or not isinstance(n, torch.fx.Node):
                return []
            if _is_fp4(n):
                return [(n, [])]
            found = []
            for arg in self._path_operands(n):
                for p, path in walk(arg, depth + 1):
                    others = [a for a in n.all_input_nodes if a is not arg]
                    if not any(_depends_on(o, p) for o in others):
                        found.append((p, path + [n]))
            return found

        options = walk(x)
        if not options:
            raise _NoProducer("no FP4 linear reaches it through per-channel linear ops only")
        if len(options) != 1:
            raise _NoFold("the input mixes several FP4 linears")
        p, path = options[0]
        chain = [p] + path
        for a, b in zip(chain, chain[1:]):
            if set(a.users) != {b}:
                others = sorted(u.name for u in a.users if u is not b)
                raise _NoFold(f"the output of {a.name} also feeds {', '.join(others[:3])} (e.g. a returned "
                              f"cache or a residual)")
        return p, path

    @staticmethod
    def _path_operands(n: torch.fx.Node):
        if n.op == "call_method" and n.target in _SHAPE_METHODS:
            return [n.args[0]]
        if n.op == "call_method" and n.target == "mul":
            return list(n.args[:2])
        if n.op != "call_function":
            return []
        if n.target in _SHAPE_FUNCS or _is_identity(n) or _is_basic_getitem(n):
            return [n.args[0]]
        if n.target in _MULS:
            return list(n.args[:2])
        if n.target in _SDPA:
            return [n.args[2] if len(n.args) > 2 else n.kwargs.get("value")]
        if n.target in _MATMULS:
            return [n.args[1]]
        return []

    def _row_map(self, p: torch.fx.Node, path: list[torch.fx.Node]) -> torch.Tensor:
        """For each channel of x (the last path node's output): the row of P it is made from."""
        rows = _concrete_shape(p)[-1]
        label = torch.arange(rows, dtype=torch.float64).expand(_concrete_shape(p))
        prev = p
        for n in path:
            out_shape = _concrete_shape(n)
            if (n.op == "call_function" and n.target in _MULS) or (n.op == "call_method" and n.target == "mul"):
                label = torch.broadcast_to(label, out_shape)
            elif n.op == "call_function" and n.target in _SDPA + _MATMULS:
                if not torch.equal(label, label[..., :1, :].expand_as(label)):
                    raise _NoFold(f"{n.name}: rows are not constant along the token dimension")
                label = label[..., :1, :]
                if n.target in _SDPA and label.dim() >= 3 and label.shape[-3] != out_shape[-3]:
                    if out_shape[-3] % label.shape[-3]:
                        raise _NoFold(f"{n.name}: query heads are not a multiple of value heads")
                    label = label.repeat_interleave(out_shape[-3] // label.shape[-3], dim=-3)
                label = torch.broadcast_to(label, out_shape)
            elif _is_identity(n) and tuple(label.shape) == out_shape:
                pass  # dtype casts keep the float64 labels
            else:
                label = self._run_shape_op(n, prev, label)
            if tuple(label.shape) != out_shape:
                raise _NoFold(f"{n.name}: could not follow the channels through this op")
            prev = n
        flat = label.reshape(-1, label.shape[-1])
        if not torch.equal(flat, flat[:1].expand_as(flat)):
            raise _NoFold("the consumer's channels do not map to fixed rows of the producer")
        return flat[0].to(torch.long)

    @staticmethod
    def _run_shape_op(n: torch.fx.Node, prev: torch.fx.Node, label: torch.Tensor) -> torch.Tensor:
        def concrete(a):
            if a is prev:
                return label
            if isinstance(a, torch.fx.Node):
                v = _val(a)
                if isinstance(v, (int, torch.SymInt)):
                    return _hint(v)
                raise _NoFold(f"{n.name}: an argument is not a known size (or is a tensor other than the path)")
            if isinstance(a, (list, tuple)):
                return type(a)(concrete(b) for b in a)
            if isinstance(a, torch.SymInt):
                return _hint(a)
            return a

        args = [concrete(a) for a in n.args]
        kwargs = {k: concrete(v) for k, v in n.kwargs.items() if k not in ("dtype", "memory_format", "device")}
        if n.op == "call_method":
            if n.target in ("to", "float"):
                return label
            return getattr(label, n.target)(*args[1:], **kwargs)
        if n.target is aten._to_copy.default:
            return label
        return n.target(*args, **kwargs)

    # -------------------------------------------------------------------------------- the pass

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        self.notes, self.folded, self.kept = [], {}, {}
        graph = gm.graph
        consumers = [n for n in graph.nodes if _is_fp4(n) and FP4_LINEAR.args_of(n)["act_shift"] is not None]
        norm_groups: dict[tuple, list] = {}
        row_folds = []
        for c in consumers:
            layer = _layer(c)
            args = FP4_LINEAR.args_of(c)
            k = self._const(gm, args["act_shift"])
            if k is None:
                self.kept[layer] = "its act_shift is not a constant of the graph"
                continue
            x = args["x"]
            channels = k.numel()
            try:
                norm, chain, consts = self._norm_producer(gm, x, channels)
                norm_groups.setdefault((norm, bytes(k.to(torch.uint8).numpy())), []).append((c, chain, consts, k))
                continue
            except _NoFold as e:
                norm_reason = str(e)
            try:
                p, path = self._row_producer(x)
                row_map = self._row_map(p, path)
                row_folds.append((c, p, row_map, k))
            except _NoProducer:
                self.kept[layer] = norm_reason
            except _NoFold as e:
                self.kept[layer] = str(e)

        modified = False
        for (norm, _), members in norm_groups.items():
            try:
                self._fold_norm(gm, norm, members)
                modified = True
            except _NoFold as e:
                for c, *_ in members:
                    self.kept[_layer(c)] = str(e)
        for c, p, row_map, k in row_folds:
            try:
                self._fold_rows(gm, c, p, row_map, k)
                modified = True
            except _NoFold as e:
                self.kept[_layer(c)] = str(e)

        if modified:
            graph.lint()
            gm.recompile()
        for layer, where in self.folded.items():
            self.notes.append(f"layer {layer}: activation exponents folded into {where}")
        for layer, why in self.kept.items():
            self.notes.append(f"layer {layer}: activation exponents kept as a run-time shift ({why})")
        for c in consumers:  # what happened to each consumer, in its node's meta too
            layer = _layer(c)
            c.meta[FOLD] = (f"activation exponents folded into {self.folded[layer]}" if layer in self.folded else
                            f"activation exponents kept as a run-time shift ({self.kept.get(layer, '?')})")
        return PassResult(gm, modified)

    @classmethod
    def from_context(cls, ctx) -> FoldActScales:
        return cls(ctx.constants)

    def _fold_norm(self, gm, norm: torch.fx.Node, members) -> None:
        graph = gm.graph
        c0, _, consts, k = members[0]
        mult = torch.ldexp(torch.ones(k.numel(), dtype=torch.float64), k.to(torch.int64))
        scaled = {key: self._scaled(val, mult, f"the {key[1]} of {norm.name}") for key, val in consts.items()}
        args, kwargs = list(norm.args), dict(norm.kwargs)
        prefix = "_lowbit_fold_" + re.sub(r"[^0-9a-zA-Z_]", "_", norm.name)
        for (pos, key), t in scaled.items():
            const = add_constant(gm, _fresh_name(gm, f"{prefix}_{key}"), t, norm)
            if pos < len(args):
                args[pos] = const
            else:
                kwargs[key] = const
        with graph.inserting_after(norm):
            folded = graph.create_node(norm.op, norm.target, tuple(args), kwargs, name=norm.name + "_folded")
        folded.meta = dict(norm.meta)
        memo = {norm: folded}
        for c, chain, _, _ in members:
            for old in chain:
                if old not in memo:
                    with graph.inserting_before(c):
                        memo[old] = graph.node_copy(old, lambda a: memo.get(a, a))
            FP4_LINEAR.update(c, x=memo[FP4_LINEAR.args_of(c)["x"]], act_shift=None)
            self.folded[_layer(c)] = f"a folded copy of {norm.name}"
        for _, chain, _, _ in members:
            for old in reversed(chain):
                if not old.users:
                    graph.erase_node(old)
        if not norm.users:
            graph.erase_node(norm)
        self._erase_unused_shift_constants(gm)

    def _fold_rows(self, gm, c: torch.fx.Node, p: torch.fx.Node, row_map: torch.Tensor, k: torch.Tensor) -> None:
        rows = _concrete_shape(p)[-1]
        kk = k.to(torch.int64)
        if row_map.numel() != kk.numel() or int(row_map.min()) < 0 or int(row_map.max()) >= rows:
            raise _NoFold("the channel map does not fit the producer")
        hi = torch.full((rows,), -1, dtype=torch.int64).scatter_reduce(0, row_map, kk, "amax")
        lo = torch.full((rows,), 1 << 20, dtype=torch.int64).scatter_reduce(0, row_map, kk, "amin")
        used = hi >= 0
        if bool((hi[used] != lo[used]).any()):
            raise _NoFold(f"channels made from the same row of {_layer(p)} have different "
                          f"exponents (e.g. attention heads sharing a key/value head)")
        s = torch.where(used, hi, torch.zeros_like(hi))
        mult = torch.ldexp(torch.ones(rows, dtype=torch.float64), s)
        producer = _layer(p)
        p_args = FP4_LINEAR.args_of(p)
        w_scales = self._const(gm, p_args["w_scales"])
        if w_scales is None:
            raise _NoFold(f"the row scales of {producer} are not constants of the graph")
        new_scales = self._scaled(w_scales, mult.reshape(-1, 1), f"the row scales of {producer}")
        bias = p_args["bias"]
        new_bias = None
        if bias is not None:
            b = self._const(gm, bias)
            if b is None:
                raise _NoFold(f"the bias of {producer} is not a constant of the graph")
            new_bias = self._scaled(b, mult, f"the bias of {producer}")
        prefix = "_lowbit_fold_" + re.sub(r"[^0-9a-zA-Z_]", "_", p.name)
        changes = {"w_scales": add_constant(gm, _fresh_name(gm, prefix + "_w_scales"), new_scales, p)}
        if new_bias is not None:
            changes["bias"] = add_constant(gm, _fresh_name(gm, prefix + "_bias"), new_bias, p)
        FP4_LINEAR.update(p, **changes)
        FP4_LINEAR.update(c, act_shift=None)
        self.folded[_layer(c)] = f"the output rows of {producer}"
        self._erase_unused_shift_constants(gm)

    @staticmethod
    def _erase_unused_shift_constants(gm) -> None:
        for n in list(gm.graph.nodes):
            if n.op == "get_attr" and not n.users and str(n.target).startswith("_lowbit_"):
                gm.graph.erase_node(n)


def fold_summary(notes) -> tuple[int, int]:
    """(folded, kept) counts from a FoldActScales' notes."""
    folded = sum("folded into" in n for n in notes)
    return folded, sum("kept as a run-time shift" in n for n in notes)
