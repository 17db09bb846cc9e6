"""rewrite_linears: replace tagged linears that have a record with their lowbit op: the record's reference op
(record.OP with record.op_arguments(), named; `lowbit::rotated_linear` for a QuantizedLinear, `lowbit::fp4_linear`
for an FP4QuantizedLinear, after its input rotation when it has one), or its CPU kernel.

The kernel is chosen here, per layer: with kernels="auto" an integer record whose weights live on the CPU
and fit the int4 kernel becomes `lowbit::int4pack_linear` (kernels/cpu.py: codes widened to the kernel's 4-bit
layout, bfloat16 activations inside the op); kernels="reference" keeps the reference ops everywhere. (FP4 linears
move to their CPU kernel later, in fp4_fast_path, once fold_act_scales has given them their final form.)
Each new op node carries in its meta (passes/base.py) the layer's FQN, what it runs and how many bits per weight it
holds in memory, and for integer layers why that kernel.

Packed codes, scales, sign vectors and activation exponents become buffers of the GraphModule (get_attr
nodes); the dense Hadamard factors (and the int4pack path's rotation blocks) are shared by every layer of the
same size. Only the linear call is replaced, so a weight that also feeds an embedding (tied lm_head) keeps
serving it in float.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .. import hadamard
from ..errors import LowbitError
from ..kernels import cpu, cpu_caps, cpu_native  # importing them registers every lowbit op named below
from ..kernels.specs import HADAMARD, INT4PACK_LINEAR, LINEAR_OPS, NATIVE_LINEAR, Shared
from ..quantize.records import QuantizedLinear
from .base import KERNEL_REASON, QUANTIZED_TAG, RUNTIME, PassBase, PassResult, add_constant, buffer_prefix
from .find_linears import TAG, linear_sites

KERNELS = ("auto", "reference")


def cpu_kernel(rec, kernels: str) -> str:
    """Which op RewriteLinears gives this record: "native" (`lowbit::native_linear`), "int4pack"
    (`lowbit::int4pack_linear`) or "reference" (kernels/cpu_caps.py decides, by what the CPU has)."""
    return cpu_caps.choose_for(rec, kernels).kernel


def pack_for_cpu(rec, kernels: str):
    """The record in its CPU kernel's form, packed once per record (None on the reference ops): the backend calls
    it layer by layer as it quantizes, so the packing temporaries of one layer are freed before the next."""
    kernel = cpu_kernel(rec, kernels)
    return cpu_native.packed_for(rec) if kernel == "native" else cpu.packed_for(rec) if kernel == "int4pack" else None


class RewriteLinears(PassBase):
    def __init__(self, records: Mapping[str, object], kernels: str = "reference"):
        super().__init__()
        if kernels not in KERNELS:
            raise LowbitError(f"rewrite_linears: kernels={kernels!r}; valid values are {KERNELS}")
        self.records = records
        self.kernels = kernels

    @classmethod
    def from_context(cls, ctx) -> RewriteLinears:
        return cls(ctx.records, ctx.kernels)

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        graph = gm.graph
        factors: dict[str, torch.fx.Node | None] = {}
        modified = False

        def constant(name: str, t: torch.Tensor, before: torch.fx.Node) -> torch.fx.Node:
            return add_constant(gm, name, t, before)

        first = next(iter(graph.nodes))
        rotations: dict[tuple, torch.fx.Node] = {}  # (input node, seed) -> its rotation, shared by a group
        blocks: dict[int, list[torch.fx.Node]] = {}  # transform size -> its Kronecker blocks (int4pack path)

        def shared(v: Shared) -> torch.fx.Node | None:  # one buffer per shared value (a factor of one size)
            if v.name not in factors:
                factors[v.name] = None if v.value is None else constant(f"_lowbit_{v.name}", v.value, first)
            return factors[v.name]

        def block_nodes(n: int) -> list[torch.fx.Node]:
            if n not in blocks:  # one buffer per distinct block: equal blocks share a name (and a source)
                has_factor = hadamard.plan(n).has_factor
                blocks[n] = [constant(f"_lowbit_rot_{'factor' if i == 0 and has_factor else 'sylvester'}_{b.shape[0]}",
                                      b, first) for i, b in enumerate(cpu.rotation_blocks(n))]
            return blocks[n]

        for node, site in linear_sites(gm):
            rec = self.records.get(site.fqn)
            if rec is None:
                continue
            if (rec.out_features, rec.in_features) != (site.out_features, site.in_features):
                raise LowbitError(
                    f"layer {site.fqn} (node {node.name}): the record is {rec.out_features}x{rec.in_features} but "
                    f"the graph's weight is {site.out_features}x{site.in_features}; the checkpoint belongs to "
                    f"another model"
                )
            p = buffer_prefix(site.fqn)
            x = node.args[0] if node.args else node.kwargs["input"]
            if node.op == "call_module":
                bias = None
                if site.has_bias:
                    with graph.inserting_before(node):
                        bias = graph.get_attr(f"{node.target}.bias")
            else:
                bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            if getattr(rec, "bias", None) is not None:  # bias correction: the record's bias replaces the graph's
                bias = constant(p + "_bias", rec.bias, node)
            choice = cpu_caps.choose_for(rec, self.kernels)
            meta = {KERNEL_REASON: choice.reason} if isinstance(rec, QuantizedLinear) else {}
            if choice.kernel in ("native", "int4pack"):  # a CPU kernel: only the packed form becomes a constant
                w = pack_for_cpu(rec, self.kernels)
                common = dict(x=x, packed=constant(p + "_packed", w.packed, node),
                              su=constant(p + "_su", rec.su, node) if rec.su is not None else None,
                              sv=constant(p + "_sv", rec.sv, node) if rec.sv is not None else None,
                              rot_in=block_nodes(rec.in_features) if rec.su is not None else [],
                              rot_out=block_nodes(rec.out_features) if rec.sv is not None else [],
                              bias=bias, in_features=rec.in_features, out_features=rec.out_features)
                with graph.inserting_before(node):
                    if choice.kernel == "native":
                        new = NATIVE_LINEAR.node(graph, **common, scales=constant(p + "_scales", w.scales, node),
                                                 bits=w.bits, zero=w.zero)
                    else:
                        new = INT4PACK_LINEAR.node(graph, **common,
                                                   scales_zeros=constant(p + "_scales_zeros", w.scales_zeros, node),
                                                   group_size=w.group_size, prefill_rows=w.prefill_rows,
                                                   prefill_bf16=w.prefill_bf16)
                _replace(graph, node, new, site.fqn, {RUNTIME: w.describe(), **meta})
                modified = True
                continue
            rotation = rec.input_rotation()
            if rotation is not None:  # x -> V x before the op: one rotation node per (input, seed), shared by a group
                key = (x, rec.seed)
                if key not in rotations:
                    signs = constant(p + "_su", rotation[0], node)
                    with graph.inserting_before(node):
                        rotations[key] = HADAMARD.node(graph, x=x, signs=signs, factor=shared(rotation[1]))
                    rotations[key].meta.update({k: v for k, v in x.meta.items() if k in ("val", "example_value",
                                                                                          "tensor_meta")})
                x = rotations[key]
            tensors = set(rec.OP.tensor_names)
            args = {n: (shared(v) if isinstance(v, Shared) else constant(f"{p}_{n}", v, node))
                    if n in tensors and v is not None else v for n, v in rec.op_arguments().items()}
            with graph.inserting_before(node):
                new = rec.OP.node(graph, x=x, bias=bias, **args)
            _replace(graph, node, new, site.fqn,
                     {RUNTIME: f"{rec.OP.qualname.split('::')[1]} {rec.bits_per_weight():.2f} b/w in memory", **meta})
            modified = True
        if modified:
            graph.lint()
            gm.recompile()
        return PassResult(gm, modified)


def _replace(graph: torch.fx.Graph, node: torch.fx.Node, new: torch.fx.Node, fqn: str, meta: dict) -> None:
    new.meta.update({k: v for k, v in node.meta.items() if k != TAG})
    new.meta[QUANTIZED_TAG] = fqn
    new.meta.update(meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def count_quantized(gm: torch.fx.GraphModule) -> int:
    """Number of lowbit linear ops (kernels/specs.LINEAR_OPS) in the graph."""
    return sum(1 for n in gm.graph.nodes if any(spec.is_call(n) for spec in LINEAR_OPS))
