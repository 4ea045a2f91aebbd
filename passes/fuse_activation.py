"""Gated MLP activation fusion: `act(gate) * up` over the two halves of the fused gate/up projection becomes
`kiln::silu_mul` or `kiln::gelu_mul` (exact or tanh-approximate GELU). Runs after fuse_linears, which produces
the halves as slices of one [T, 2I] matmul; separate gate/up tensors are left to region fusion."""
from __future__ import annotations

import torch
import torch.fx as fx

import kiln.ops  # noqa: F401  (declares the kiln:: ops)

from .base import GraphPass, PassContext, is_op
from .fuse_common import call, last_dim, single_user, val


def _half(node: object) -> tuple[fx.Node, int] | None:
    """(source, 0 or 1) when `node` is the first or second half of its source's last dim."""
    if not is_op(node, "slice") or len(node.args) < 4 or not last_dim(node.args[0], node.args[1]):
        return None
    src, start, end = node.args[0], node.args[2], node.args[3]
    width = val(src).shape[-1]
    if (start, end) == (0, width // 2):
        return src, 0
    if start == width // 2 and end in (width, 2**63 - 1):
        return src, 1
    return None


def _activation(node: object) -> tuple[str, object, tuple] | None:
    """(counter name, kiln op, extra args) for silu and gelu (whose `approximate` carries over)."""
    if is_op(node, "silu"):
        return "silu_mul", torch.ops.kiln.silu_mul.default, ()
    if is_op(node, "gelu"):
        approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        return "gelu_mul", torch.ops.kiln.gelu_mul.default, (approximate,)
    return None


class FuseActivation(GraphPass):
    name = "fuse_activation"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> dict[str, int]:
        counts = {"silu_mul": 0, "gelu_mul": 0}
        for node in list(gm.graph.nodes):
            if not is_op(node, "mul") or len(node.args) != 2:
                continue
            for act, up in (node.args, node.args[::-1]):
                found = _activation(act)
                gate, other = _half(act.args[0]) if found and single_user(act) else None, _half(up)
                if gate and other and gate[0] is other[0] and (gate[1], other[1]) == (0, 1):
                    key, op, extra = found
                    with gm.graph.inserting_before(node):
                        fused = call(gm.graph, op, (gate[0], *extra), node)
                    node.replace_all_uses_with(fused)
                    gm.graph.erase_node(node)
                    gm.graph.erase_node(act)
                    counts[key] += 1
                    break
        return counts
