"""Module form of a quantized linear, for torch.export-based paths (ExecuTorch, ONNX) and eager use.

`swap_linears(model, records)` replaces each named nn.Linear by a LowbitLinear (integer record: one
`lowbit::rotated_linear` call) or a LowbitFP4Linear (FP4 record: one `lowbit::fp4_linear` call) whose
buffers are the packed record. Tied weights stay with the module that still uses them (an embedding keeps
its float weight when a tied lm_head is swapped).

These modules run the reference ops: the exporters build on them. `swap_linears(..., fast=True)` puts the CPU
fast forms in their place: for each integer record the CPU kernel kernels/cpu_caps.py chooses here, a
NativeLinear (native 2/3/4-bit kernels, `lowbit::native_linear`) or an Int4PackLinear (CPU int4 kernel,
`lowbit::int4pack_linear`, bfloat16 activations inside the op, kernels/cpu.py), and an FP4PackLinear
(`lowbit::fp4pack_linear`, the same kernel, kernels/cpu_fp4.py) for each FP4 record on the CPU.

An FP4 W4A4 module applies its per-channel activation exponents at run time (`act_shift`); folding them
into the producer of its input is a graph transformation (passes/fold_act_scales.py) that the backend applies
to the Dynamo graph. The exporters do not fold: they replace these modules by their runtime forms before
capture (export/decompose.py), so no `lowbit::fp4_linear` node is left for the pass to match, and an exported
W4A4 layer keeps its shift as one exact multiply by a constant power-of-two vector (it costs one elementwise op
per layer; both forms give the same outputs bit for bit). Folding there needs the lowbit ops decomposed at graph
level (`ExportedProgram.run_decompositions` with a table for the lowbit ops) instead of module swaps.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch

from . import hadamard, kernels  # noqa: F401  (registers the ops)
from .checkpoint import Checkpoint
from .errors import LowbitError
from .kernels import cpu, cpu_caps, cpu_fp4, cpu_native
from .kernels.specs import EMBEDDING, FP4PACK_LINEAR, HADAMARD, INT4PACK_LINEAR, NATIVE_LINEAR, unshared
from .quantize.records import FP4QuantizedLinear, QuantizedLinear


class _LowbitModule(torch.nn.Module):
    """A record as a module: its reference op (record.OP) with the op's tensor arguments as buffers and the others
    as attributes, named as the op names them (record.op_arguments()); the record's input rotation, if any, runs
    first (`lowbit::hadamard`, buffers su and had_in); then bias. A new record kind needs no module of its own."""

    def __init__(self, rec, bias: torch.Tensor | None = None):
        super().__init__()
        self.fqn = rec.fqn
        self.in_features, self.out_features = rec.in_features, rec.out_features
        self.op = rec.OP
        args = {n: unshared(v) for n, v in rec.op_arguments().items()}
        tensors = set(self.op.tensor_names)
        self._scalars = [n for n in args if n not in tensors]
        self._tensors = [n for n in args if n in tensors]
        for name in self._tensors:
            self.register_buffer(name, None if args[name] is None else args[name].clone())
        for name in self._scalars:
            setattr(self, name, args[name])
        rotation = rec.input_rotation()
        self._rotated_input = rotation is not None
        if "su" not in self._tensors:  # every module has su and had_in (None: no rotation), as the exporters read
            self.register_buffer("su", None if rotation is None else rotation[0].clone())
            self.register_buffer("had_in", None if rotation is None else unshared(rotation[1]))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._rotated_input:
            x = HADAMARD(x=x, signs=self.su, factor=self.had_in)
        return self.op(x=x, bias=self.bias, **{n: getattr(self, n) for n in self._tensors + self._scalars})


class LowbitLinear(_LowbitModule):
    """An integer record: one `lowbit::rotated_linear` call."""

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits}, "
                f"group_size={self.group_size}, rotated={self.su is not None}")


class LowbitFP4Linear(_LowbitModule):
    """An LLM-FP4 linear: y = Q_a(x ⊙ 2**act_shift) · Ŵ'ᵀ + bias (see kernels/fp4_ops.py), after a
    randomized Hadamard rotation of x for rotated records (fp4-rot)."""

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, fp4 w:{self.w_format} "
                f"a:{self.a_format or 'float'}, act_shift={self.act_shift is not None}, "
                f"rotated={self._rotated_input}")


class CalibrationFP4Linear(LowbitFP4Linear):
    """LowbitFP4Linear for lb.quantize's sequential calibration passes. On the CPU its op runs lowbit::fp4_linear's
    reference, which decodes the weight and rounds the activations in torch on every call; this module computes the
    same numbers with the same functions (bit for bit: tests/test_fp4_pipeline.py), the weight decoded once and the
    activations rounded by quantize.fp4.round_fp4 (one native pass when the library is there). Elsewhere (CUDA), or
    on a wrong input size, it is LowbitFP4Linear."""

    def __init__(self, rec: FP4QuantizedLinear, bias: torch.Tensor | None = None):
        super().__init__(rec, bias)
        self._weight: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .kernels.fp4_ops import dequantize_fp4_weight, fp4_linear_decoded
        from .quantize.fp4 import round_fp4

        if x.device.type != "cpu" or x.shape[-1] != self.in_features or self.a_format is None:
            return super().forward(x)
        if self._rotated_input:
            x = HADAMARD(x=x, signs=self.su, factor=self.had_in)
        if self._weight is None:
            self._weight = dequantize_fp4_weight(self.qweight, self.w_scales, self.w_format, self.in_features)
        return fp4_linear_decoded(x, self._weight, self.act_shift, self.act_scale, self.a_format, self.bias,
                                  rounding=round_fp4)


class DequantizedLinear(torch.nn.Module):
    """A quantized layer as lb.quantize's sequential calibration runs it when its record holds its own bias (bias
    correction): the record's dequantized float32 weight and that bias, y = x Ŵᵀ + b, in x's dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight.detach().to(torch.float32))
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), b)


class _Rotations(torch.nn.Module):
    """Holds the Kronecker rotation blocks of a CPU fast form as non-persistent buffers (constants of the
    transform size, not part of the state dict)."""

    def _register_rotations(self, rec) -> None:
        self.n_rot_in = self.n_rot_out = 0
        for side, n, on in (("in", rec.in_features, rec.su is not None), ("out", rec.out_features,
                                                                           getattr(rec, "sv", None) is not None)):
            blocks = cpu.rotation_blocks(n) if on else ()
            setattr(self, f"n_rot_{side}", len(blocks))
            for i, b in enumerate(blocks):
                self.register_buffer(f"rot_{side}_{i}", b, persistent=False)

    def _rotations(self):
        return ([getattr(self, f"rot_in_{i}") for i in range(self.n_rot_in)],
                [getattr(self, f"rot_out_{i}") for i in range(self.n_rot_out)])


class Int4PackLinear(_Rotations):
    """The CPU fast form of an integer record: codes widened into the int4 kernel's layout (2/3-bit records take
    4 bits per weight in memory), one `lowbit::int4pack_linear` call. Results match LowbitLinear to bfloat16
    activation precision (kernels/cpu.py)."""

    def __init__(self, rec: QuantizedLinear, bias: torch.Tensor | None = None):
        super().__init__()
        w = cpu.pack_int4(rec)
        self.fqn = rec.fqn
        self.in_features, self.out_features = rec.in_features, rec.out_features
        self.bits, self.group_size = rec.bits, w.group_size  # the record's width; the kernel's group size
        self.prefill_rows, self.prefill_bf16 = w.prefill_rows, w.prefill_bf16
        self.runtime = w.describe()
        self.register_buffer("packed", w.packed)
        self.register_buffer("scales_zeros", w.scales_zeros)
        self.register_buffer("su", None if rec.su is None else rec.su.clone())
        self.register_buffer("sv", None if rec.sv is None else rec.sv.clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._register_rotations(rec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rot_in, rot_out = self._rotations()
        return INT4PACK_LINEAR(x=x, packed=self.packed, scales_zeros=self.scales_zeros, su=self.su, sv=self.sv,
                               rot_in=rot_in, rot_out=rot_out, bias=self.bias, in_features=self.in_features,
                               out_features=self.out_features, group_size=self.group_size,
                               prefill_rows=self.prefill_rows, prefill_bf16=self.prefill_bf16)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits} as "
                f"{self.runtime}, rotated={self.su is not None}")


class NativeLinear(_Rotations):
    """The native CPU form of an integer record (kernels/cpu_native.py): codes at their own width in the native
    layout, one `lowbit::native_linear` call (int8 activations for few rows, a float32 GEMM for prefill)."""

    def __init__(self, rec: QuantizedLinear, bias: torch.Tensor | None = None):
        super().__init__()
        w = cpu_native.pack_native(rec)
        self.fqn = rec.fqn
        self.in_features, self.out_features, self.bits, self.zero = rec.in_features, rec.out_features, w.bits, w.zero
        self.runtime = w.describe()
        self.register_buffer("packed", w.packed)
        self.register_buffer("scales", w.scales)
        self.register_buffer("su", None if rec.su is None else rec.su.clone())
        self.register_buffer("sv", None if rec.sv is None else rec.sv.clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._register_rotations(rec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rot_in, rot_out = self._rotations()
        return NATIVE_LINEAR(x=x, packed=self.packed, scales=self.scales, su=self.su, sv=self.sv, rot_in=rot_in,
                             rot_out=rot_out, bias=self.bias, bits=self.bits, zero=self.zero,
                             in_features=self.in_features, out_features=self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits} as "
                f"{self.runtime}, rotated={self.su is not None}")


class FP4PackLinear(_Rotations):
    """The CPU fast form of an FP4 record: codes as int4 digits (kernels/cpu_fp4.py), one
    `lowbit::fp4pack_linear` call that also applies the fp4-rot rotation and the activation exponents. Results
    match LowbitFP4Linear to bfloat16 precision."""

    def __init__(self, rec: FP4QuantizedLinear, bias: torch.Tensor | None = None):
        super().__init__()
        w = cpu_fp4.pack_fp4(rec.qweight, rec.w_scales, rec.w_format, rec.in_features, rec.fqn)
        self.fqn = rec.fqn
        self.in_features, self.out_features = rec.in_features, rec.out_features
        self.w_format, self.a_format = rec.w_format, rec.a_format
        self.group_size, self.digit_base = w.group_size, w.digit_base
        self.prefill_rows, self.prefill_bf16 = w.prefill_rows, w.prefill_bf16
        self.runtime = w.describe()
        self.register_buffer("packed", w.packed)
        self.register_buffer("scales_zeros", w.scales_zeros)
        self.register_buffer("row_scale", w.row_scale)
        self.register_buffer("su", None if rec.su is None else rec.su.clone())
        self.register_buffer("act_shift", None if rec.act_exponents is None else rec.act_exponents.clone())
        self.register_buffer("act_scale", None if rec.act_scale is None else rec.act_scale.clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._register_rotations(rec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rot_in, _ = self._rotations()
        return FP4PACK_LINEAR(x=x, packed=self.packed, scales_zeros=self.scales_zeros, row_scale=self.row_scale,
                              su=self.su, rot_in=rot_in, act_shift=self.act_shift, act_scale=self.act_scale,
                              a_format=self.a_format, bias=self.bias, in_features=self.in_features,
                              out_features=self.out_features, group_size=self.group_size,
                              digit_base=self.digit_base, prefill_rows=self.prefill_rows,
                              prefill_bf16=self.prefill_bf16)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, fp4 w:{self.w_format} "
                f"a:{self.a_format or 'float'} as {self.runtime}, rotated={self.su is not None}")


class LowbitEmbedding(torch.nn.Module):
    """A token embedding from an integer record (unrotated: rows num_embeddings × embedding_dim as packed codes and
    scales): one `lowbit::embedding` gather that decodes the looked-up rows only."""

    def __init__(self, rec: QuantizedLinear):
        super().__init__()
        if rec.su is not None or rec.sv is not None:
            raise LowbitError(f"embedding {rec.fqn}: the record is rotated; an embedding needs an unrotated one")
        self.fqn = rec.fqn
        self.num_embeddings, self.embedding_dim = rec.out_features, rec.in_features
        self.bits, self.group_size = rec.bits, rec.group_size
        self.register_buffer("qweight", rec.qweight.clone())
        self.register_buffer("scales", rec.scales.clone())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return EMBEDDING(ids=ids, qweight=self.qweight, scales=self.scales, bits=self.bits,
                         embedding_dim=self.embedding_dim, group_size=self.group_size)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, int{self.bits}, group_size={self.group_size}")


def lowbit_module(rec, bias: torch.Tensor | None = None, fast: bool = False) -> torch.nn.Module:
    """The run-time module of one record: the reference module, or with fast=True the CPU fast form where the
    record has one."""
    if isinstance(rec, FP4QuantizedLinear):
        if fast and cpu_fp4.unsupported_reason(rec.qweight) is None:
            return FP4PackLinear(rec, bias)
        return LowbitFP4Linear(rec, bias)
    if isinstance(rec, QuantizedLinear):
        kernel = cpu_caps.choose_for(rec).kernel if fast else "reference"
        if kernel == "native":
            return NativeLinear(rec, bias)
        if kernel == "int4pack":
            return Int4PackLinear(rec, bias)
        return LowbitLinear(rec, bias)
    raise LowbitError(f"layer {getattr(rec, 'fqn', '?')}: not a quantized linear record ({type(rec).__name__})")


def record_bias(rec, bias: torch.Tensor | None) -> torch.Tensor | None:
    """The bias a quantized layer applies: the record's own when bias correction set one, else the model's `bias`."""
    own = getattr(rec, "bias", None)
    return bias if own is None else own


def swap_linears(model: torch.nn.Module, records: Mapping[str, QuantizedLinear | FP4QuantizedLinear],
                 inplace: bool = False, make_module=None, fast: bool = False, make_embedding=None):
    """Replace each nn.Linear named in `records` by its LowbitLinear / LowbitFP4Linear, and each nn.Embedding named
    there by a LowbitEmbedding (on a deep copy unless inplace). `make_module(record, bias)` and
    `make_embedding(record)` build other module kinds (the exporters' forms); fast=True uses the CPU fast forms
    (NativeLinear, Int4PackLinear, FP4PackLinear) for every record that has one. A record that serves an embedding
    and its tied head is held once: the head's reference module reads the embedding's buffers."""
    if make_module is not None and fast:
        raise LowbitError("swap_linears: pass either make_module or fast=True, not both")
    make_module = make_module or (lambda rec, bias: lowbit_module(rec, bias, fast=fast))
    make_embedding = make_embedding or LowbitEmbedding
    records = getattr(records, "records", records)  # a Checkpoint or its records
    Checkpoint(records=dict(records)).check_model(model)  # every name/shape difference at once, before copying
    if not inplace:
        model = copy.deepcopy(model)
    made: dict[int, torch.nn.Module] = {}  # id(record) -> the embedding module made from it
    for fqn, rec in sorted(records.items(), key=lambda kv: not isinstance(_module(model, kv[0]), torch.nn.Embedding)):
        old = _module(model, fqn)
        if isinstance(old, torch.nn.Embedding):
            if old.max_norm is not None:
                raise LowbitError(f"embedding {fqn}: max_norm renormalizes rows at run time, which a quantized "
                                  f"table cannot do; keep it in float")
            new = made[id(rec)] = make_embedding(rec)
        elif isinstance(old, torch.nn.Linear):
            new = make_module(rec, record_bias(rec, old.bias))
            shared = made.get(id(rec))
            if shared is not None:  # a tied head: the embedding's table, not a copy of it
                for name in ("qweight", "scales"):
                    a, b = getattr(new, name, None), getattr(shared, name, None)
                    # only the very same data: a fast form's repacked codes or float32 scales stay its own
                    # (torch.equal compares float16 and float32 values as equal)
                    if (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                            and a.shape == b.shape and torch.equal(a, b)):
                        setattr(new, name, b)
        else:
            raise LowbitError(f"layer {fqn}: expected nn.Linear or nn.Embedding, found {type(old).__name__}")
        parent_name, _, child = fqn.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    return model


def _module(model: torch.nn.Module, fqn: str) -> torch.nn.Module:
    try:
        return model.get_submodule(fqn)
    except AttributeError:
        raise LowbitError(f"layer {fqn}: no such module in this model; the checkpoint belongs to another "
                          f"model") from None
