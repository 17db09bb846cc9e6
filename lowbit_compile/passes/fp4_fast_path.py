"""fp4_fast_path: put FP4 linears on the CPU int4 kernel (`lowbit::fp4_linear` -> `lowbit::fp4pack_linear`).

Runs after fold_act_scales, so it sees each FP4 linear in its final form: row scales possibly multiplied by a
consumer's activation exponents, `act_shift` None where the exponents were folded into the producer. Each
`lowbit::fp4_linear` whose codes and row scales are CPU constants of the graph becomes one
`lowbit::fp4pack_linear` (kernels/cpu_fp4.py) with the same activation arguments; an fp4-rot input rotation
(`lowbit::hadamard` feeding the linear) moves into the op as Kronecker blocks, and the hadamard node goes once
it has no other user. The original codes leave the graph. `runtimes[fqn]` says what each moved layer runs; a
layer whose codes are not CPU constants keeps the reference op (and the runtime RewriteLinears gave it).
"""

from __future__ import annotations

import torch

from ..kernels import cpu, cpu_fp4
from .base import PassBase, PassResult, add_constant, get_attr_tensor
from .rewrite_linears import QUANTIZED_TAG, _buffer_prefix

FP4_OP = torch.ops.lowbit.fp4_linear.default
FP4PACK_OP = torch.ops.lowbit.fp4pack_linear.default
HADAMARD_OP = torch.ops.lowbit.hadamard.default


class FP4FastPath(PassBase):
    def __init__(self):
        super().__init__()
        self.runtimes: dict[str, str] = {}

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        graph = gm.graph
        blocks: dict[int, list[torch.fx.Node]] = {}
        modified = False
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target is not FP4_OP:
                continue
            fqn = node.meta.get(QUANTIZED_TAG, node.name)
            x, qw_n, ws_n, act_shift, act_scale, w_format, a_format, bias, in_features = node.args
            qw, ws = get_attr_tensor(gm, qw_n), get_attr_tensor(gm, ws_n)
            if qw is None or ws is None or cpu_fp4.unsupported_reason(qw) is not None:
                continue  # not constants of the graph, or not for this kernel: the reference op stays
            w = cpu_fp4.pack_fp4(qw, ws, w_format, in_features, fqn)
            su = None
            rotation = x if isinstance(x, torch.fx.Node) and x.target is HADAMARD_OP else None
            if rotation is not None:  # fp4-rot: hadamard(x, su, factor) -> inside the op
                x, su = rotation.args[0], rotation.args[1]
                if in_features not in blocks:  # at the top: nodes there may be erased below, so look it up now
                    first = next(iter(graph.nodes))
                    blocks[in_features] = [add_constant(gm, f"_lowbit_rot_fp4_{in_features}_{i}", b, first)
                                           for i, b in enumerate(cpu.rotation_blocks(in_features))]
            p = _buffer_prefix(fqn)
            args = (x, add_constant(gm, p + "_fp4pack", w.packed, node),
                    add_constant(gm, p + "_fp4pack_scales_zeros", w.scales_zeros, node),
                    add_constant(gm, p + "_fp4pack_row_scale", w.row_scale, node), su,
                    blocks[in_features] if su is not None else [], act_shift, act_scale, a_format, bias,
                    in_features, w.out_features, w.group_size, w.digit_base, w.prefill_rows, w.prefill_bf16)
            with graph.inserting_before(node):
                new = graph.call_function(FP4PACK_OP, args)
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            dead = [qw_n, ws_n] + ([rotation, *rotation.args[1:]] if rotation is not None else [])
            for d in dead:  # the old form's nodes nothing else reads (a shared rotation stays for its other users)
                if isinstance(d, torch.fx.Node) and not d.users:
                    graph.erase_node(d)
            self.runtimes[fqn] = w.describe()
            modified = True
        if modified:
            graph.lint()
            gm.recompile()
        return PassResult(gm, modified)
