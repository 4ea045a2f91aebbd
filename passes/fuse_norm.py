"""Norm fusion: RMSNorm (Llama and Gemma forms) and LayerNorm, with the residual add before them, become
`kiln::rms_norm` / `kiln::add_rms_norm` / `kiln::layer_norm` / `kiln::add_layer_norm`.

RMSNorm is matched as HF writes it: `w * (x * rsqrt(mean(x², -1) + eps))` (or `(1 + w)` for Gemma), through the
float32 casts it carries in half-precision graphs. A residual add `a + b` feeding the norm is folded in; its
sum stays available as the op's second output, the residual stream of the next layer.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from kiln import ops  # noqa: F401  (declares the kiln:: ops)

from .base import GraphPass, PassContext, is_op
from .fuse_common import CASTS, call, param, single_user, strip_casts, val

kiln = torch.ops.kiln


def _other(node: fx.Node, known: object) -> object:
    a, b = node.args[:2]
    return b if a is known else a if b is known else None


def _match_rms(gm: fx.GraphModule, rsqrt: fx.Node) -> tuple | None:
    """(x, weight get_attr, eps, weight_offset, output node, pattern nodes) for an RMSNorm ending at rsqrt."""
    add = rsqrt.args[0]
    if not (is_op(add, "add") and isinstance(add.args[1], float) and single_user(add)):
        return None
    mean = add.args[0]
    if not (is_op(mean, "mean") and single_user(mean) and list(mean.args[1]) in ([-1], [val(mean).dim() - 1])):
        return None
    square = mean.args[0]
    if not (is_op(square, "pow") and square.args[1] == 2 and single_user(square) and single_user(rsqrt)):
        return None
    xf = square.args[0]
    normed = next(iter(rsqrt.users))
    if not (is_op(normed, "mul") and _other(normed, rsqrt) is xf):
        return None
    nodes, cur = [square, mean, add, rsqrt, normed], normed
    while single_user(cur) and is_op(next(iter(cur.users)), *CASTS):
        cur = next(iter(cur.users))
        nodes.append(cur)
    scale = next(iter(cur.users)) if single_user(cur) else None
    weight = _other(scale, cur) if is_op(scale, "mul") else None
    offset = 0.0
    if is_op(weight, "add") and weight.args[1] == 1.0 and single_user(weight):
        nodes.append(weight)
        weight, offset = strip_casts(weight.args[0]), 1.0
    w = param(gm, weight)
    x, out = strip_casts(xf), scale
    while single_user(out) and is_op(next(iter(out.users)), *CASTS):
        out = next(iter(out.users))
    if w is None or w.dim() != 1 or val(out) is None or val(x) is None or val(out).dtype != val(x).dtype:
        return None
    return x, weight, float(add.args[1]), offset, out, nodes + [scale]


def _residual(x: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(a, b) when x = a + b elementwise, same shape and dtype (no broadcasting, no alpha)."""
    if not (is_op(x, "add") and not x.kwargs and len(x.args) == 2):
        return None
    a, b = x.args
    same = [val(n) is not None and val(n).shape == val(x).shape and val(n).dtype == val(x).dtype for n in (a, b)]
    return (a, b) if all(same) else None


def _replace(gm: fx.GraphModule, x: fx.Node, out: fx.Node, plain: object, fused: object, tail: tuple) -> str:
    """Insert the (add_)norm right after x, rewire its users; return the counter name."""
    graph, res = gm.graph, _residual(x)
    with graph.inserting_after(x):
        if res is None:
            node = call(graph, plain, (x, *tail), out)
            out.replace_all_uses_with(node)
            return plain.name().split("::")[-1]
        both = call(graph, fused, (*res, *tail), out)
    with graph.inserting_after(both):
        normed = call(graph, operator.getitem, (both, 0), out)
        summed = call(graph, operator.getitem, (both, 1), x)
    out.replace_all_uses_with(normed)
    x.replace_all_uses_with(summed)
    return fused.name().split("::")[-1]


class FuseNorm(GraphPass):
    name = "fuse_norm"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> dict[str, int]:
        counts = {"rms_norm": 0, "add_rms_norm": 0, "layer_norm": 0, "add_layer_norm": 0}
        for node in list(gm.graph.nodes):
            if is_op(node, "rsqrt"):
                m = _match_rms(gm, node)
                if m is None:
                    continue
                x, weight, eps, offset, out, nodes = m
                key = _replace(gm, x, out, kiln.rms_norm.default, kiln.add_rms_norm.default, (weight, eps, offset))
                for dead in reversed(nodes):
                    if not dead.users:
                        gm.graph.erase_node(dead)
            elif is_op(node, "layer_norm") and len(node.args[1]) == 1:  # over the last dim only
                x, _, weight, bias, eps = (list(node.args) + [None, None, 1e-5])[:5]
                key = _replace(gm, x, node, kiln.layer_norm.default, kiln.add_layer_norm.default, (weight, bias, eps))
                gm.graph.erase_node(node)
            else:
                continue
            counts[key] += 1
        return counts
