"""fp4_fast_path: put FP4 linears on the CPU int4 kernel (`lowbit::fp4_linear` -> `lowbit::fp4pack_linear`).

Runs after fold_act_scales, so it sees each FP4 linear in its final form: row scales possibly multiplied by a
consumer's activation exponents, `act_shift` None where the exponents were folded into the producer. Each
`lowbit::fp4_linear` whose codes and row scales are CPU constants of the graph becomes one
`lowbit::fp4pack_linear` (kernels/cpu_fp4.py) with the same activation arguments; an fp4-rot input rotation
(`lowbit::hadamard` feeding the linear) moves into the op as Kronecker blocks, and the hadamard node goes once
it has no other user. The original codes leave the graph. The new node's meta says what the layer now runs
(passes/base.RUNTIME); a layer whose codes are not CPU constants keeps the reference op (and its meta). Constructed
with enabled=False (kernels="reference") the pass changes nothing.
"""

from __future__ import annotations

import torch

from ..kernels import cpu, cpu_fp4
from ..kernels.specs import FP4_LINEAR, FP4PACK_LINEAR, HADAMARD
from .base import QUANTIZED_TAG, RUNTIME, PassBase, PassResult, add_constant, buffer_prefix, get_attr_tensor


class FP4FastPath(PassBase):
    def __init__(self, enabled: bool = True):
        super().__init__()
        self.enabled = enabled

    @classmethod
    def from_context(cls, ctx) -> FP4FastPath:
        return cls(enabled=ctx.kernels == "auto")

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        if not self.enabled:
            return PassResult(gm, False)
        graph = gm.graph
        blocks: dict[int, list[torch.fx.Node]] = {}
        modified = False
        for node in list(graph.nodes):
            if not FP4_LINEAR.is_call(node):
                continue
            fqn = node.meta.get(QUANTIZED_TAG, node.name)
            a = FP4_LINEAR.args_of(node)
            x, qw_n, ws_n, in_features = a["x"], a["qweight"], a["w_scales"], a["in_features"]
            qw, ws = get_attr_tensor(gm, qw_n), get_attr_tensor(gm, ws_n)
            if qw is None or ws is None or cpu_fp4.unsupported_reason(qw) is not None:
                continue  # not constants of the graph, or not for this kernel: the reference op stays
            w = cpu_fp4.pack_fp4(qw, ws, a["w_format"], in_features, fqn)
            su = None
            rotation = x if HADAMARD.is_call(x) else None
            if rotation is not None:  # fp4-rot: hadamard(x, su, factor) -> inside the op
                r = HADAMARD.args_of(rotation)
                x, su = r["x"], r["signs"]
                if in_features not in blocks:  # at the top: nodes there may be erased below, so look it up now
                    first = next(iter(graph.nodes))
                    blocks[in_features] = [add_constant(gm, f"_lowbit_rot_fp4_{in_features}_{i}", b, first)
                                           for i, b in enumerate(cpu.rotation_blocks(in_features))]
            p = buffer_prefix(fqn)
            with graph.inserting_before(node):
                new = FP4PACK_LINEAR.node(
                    graph, x=x, packed=add_constant(gm, p + "_fp4pack", w.packed, node),
                    scales_zeros=add_constant(gm, p + "_fp4pack_scales_zeros", w.scales_zeros, node),
                    row_scale=add_constant(gm, p + "_fp4pack_row_scale", w.row_scale, node), su=su,
                    rot_in=blocks[in_features] if su is not None else [], act_shift=a["act_shift"],
                    act_scale=a["act_scale"], a_format=a["a_format"], bias=a["bias"], in_features=in_features,
                    out_features=w.out_features, group_size=w.group_size, digit_base=w.digit_base,
                    prefill_rows=w.prefill_rows, prefill_bf16=w.prefill_bf16)
            new.meta.update(node.meta)
            new.meta[RUNTIME] = w.describe()
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            dead = [qw_n, ws_n] + ([rotation, *rotation.all_input_nodes[1:]] if rotation is not None else [])
            for d in dead:  # the old form's nodes nothing else reads (a shared rotation stays for its other users)
                if isinstance(d, torch.fx.Node) and not d.users:
                    graph.erase_node(d)
            modified = True
        if modified:
            graph.lint()
            gm.recompile()
        return PassResult(gm, modified)
