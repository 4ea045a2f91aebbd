"""The last pass of each backend: swap each `torch.ops.kiln.X` call in the final graph for what runs it.

Backend "triton": the op's generated-kernel launcher, and each fused region one generated kernel (regions.py).
Plain GEMMs stay on torch (cuBLAS); kiln ops without a launcher keep their torch implementation. Backend
"reference": what `kiln.backends.cpu.lowering.reference_calls` maps the op to, called directly: the op's
C-backed function where the CPU backend has one (it runs the C kernel when a call applies, else the op's
pure-torch reference), else the reference itself (`kiln.ops.fused.gelu_mul`, ...); `aten.linear` goes through
`kiln.backends.cpu.kernels.linear` (on CPU a C loop for the few rows of small-batch decode, oneDNN over blocked
weights above that; torch elsewhere); int8 and W8A8 weights on CPU are rewritten into the tiles their C kernels
read. Graph passes rather than dispatch-key registrations, so the generated forward says what runs.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from kiln.backends.cpu.lowering import reference_calls
from kiln.ops import quant as Q
from kiln.passes.base import GraphPass, PassContext, op_name
from kiln.passes.fuse_common import drop_attr, new_attr, param

from .regions import lower_regions


class LowerToReference(GraphPass):
    name = "lower_reference"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> dict[str, int]:
        tiled = _tile_int8_weights(gm)
        found = reference_calls()
        called = 0
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in found:
                node.target = found[node.target]
                called += 1
        return {"called_directly": called, "int8_weights_tiled": tiled}


def _tile_int8_weights(gm: fx.GraphModule) -> int:
    """int8 and W8A8 linears over CPU weights take their CPU kernel's tile layout (`kiln::linear_int8_packed`,
    `kiln::linear_w8a8_packed`): the weight is rewritten once here, so artifacts store it that way and no step
    ever repacks it."""
    layouts = {  # op -> (op over the tiled weight, whether a weight fits, packing)
        torch.ops.kiln.linear_int8.default: (torch.ops.kiln.linear_int8_packed.default, Q.packs_int8, Q.pack_int8),
        torch.ops.kiln.linear_w8a8.default: (torch.ops.kiln.linear_w8a8_packed.default, Q.packs_w8a8, Q.pack_w8a8),
    }
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in layouts:
            continue
        tiled_op, fits, pack = layouts[node.target]
        weight_node = node.args[1]
        weight = param(gm, weight_node)
        if (
            weight is None
            or not weight.is_cpu
            or not fits(weight)
            or any(user.target != node.target or user.args[1] is not weight_node for user in weight_node.users)
        ):
            continue
        tiled = new_attr(gm, f"{weight_node.target}_tiled", pack(weight), node, buffer=True)
        for user in list(weight_node.users):
            user.target = tiled_op
            user.args = (user.args[0], tiled, *user.args[2:])
        drop_attr(gm, weight_node)
        count += 1
    return count


class LowerToTriton(GraphPass):
    name = "lower_triton"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> dict[str, int]:
        from .lowerings import lowerings  # the launchers declare the ops they run; only this backend needs them

        table = lowerings()
        regions, inlined = lower_regions(gm, table["kiln.region"])
        launchers = set(table.values())
        lowered = kept = 0
        for node in gm.graph.nodes:
            if node.op != "call_function" or node.target in launchers:
                continue
            name = op_name(node)
            launcher = table.get(name)
            if launcher is not None:
                node.target = launcher
                lowered += 1
            elif name.startswith("kiln."):
                kept += 1
        return {"lowered": lowered, "kept_reference": kept, "regions_as_kernels": regions, "regions_inlined": inlined}
