"""Horizontal linear fusion: linears that read the same input become one matmul over concatenated weights.

q/k/v projections become one [Hq*D + 2*Hkv*D, hidden] matmul, gate/up one [2I, hidden] matmul; each old output
is a slice of the fused one (a view). Weights are concatenated once at compile time; the old parameters are
removed from the module so the engine does not hold them twice.
"""

from __future__ import annotations

import os

import torch
from torch import fx

from .base import GraphPass, PassContext, is_op
from .fuse_common import arg_node, aten, call, drop_attr, new_attr, param


def _fused_name(targets: list[str]) -> str:
    """`a.self_attn.q_proj.weight`, `...k_proj.weight` -> `a.self_attn.q_k_v_proj` (the common owner keeps it)."""
    modules = [t.rpartition(".")[0] for t in targets]
    owner = os.path.commonprefix([m + "." for m in modules]).rpartition(".")[0]
    leaves = [m[len(owner) :].lstrip(".").replace(".", "_") for m in modules]
    suffix = os.path.commonprefix([leaf[::-1] for leaf in leaves])[::-1]
    stems = [leaf[: len(leaf) - len(suffix)] if suffix and leaf != suffix else leaf for leaf in leaves]
    return ".".join(filter(None, [owner, "_".join(stems) + suffix]))


def _tensor(gm: fx.GraphModule, node: fx.Node, index: int) -> torch.Tensor:
    """The parameter argument `index` of a fusible linear reads (checked by `_fusible`)."""
    tensor = param(gm, node.args[index])
    assert tensor is not None
    return tensor


class FuseLinears(GraphPass):
    name = "fuse_linears"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> dict[str, int]:
        groups: dict[tuple[fx.Node, bool], list[fx.Node]] = {}
        for node in gm.graph.nodes:
            if is_op(node, "linear") and self._fusible(gm, node):
                has_bias = len(node.args) > 2 and node.args[2] is not None
                groups.setdefault((arg_node(node, 0), has_bias), []).append(node)
        matched = fused = 0
        for (_, has_bias), linears in groups.items():
            if len(linears) < 2 or len({_tensor(gm, n, 1).dtype for n in linears}) > 1:
                continue
            self._fuse(gm, linears, has_bias)
            matched += 1
            fused += len(linears)
        return {"matched": matched, "linears_fused": fused}

    @staticmethod
    def _fusible(gm: fx.GraphModule, node: fx.Node) -> bool:
        """A linear whose weight (and bias) are parameters nothing else reads (tied weights stay separate)."""
        inputs = [a for a in node.args[1:3] if a is not None]
        return isinstance(node.args[0], fx.Node) and all(
            isinstance(a, fx.Node) and param(gm, a) is not None and len(a.users) == 1 for a in inputs
        )

    @staticmethod
    def _fuse(gm: fx.GraphModule, linears: list[fx.Node], has_bias: bool) -> None:
        graph, first = gm.graph, linears[0]
        weights = [arg_node(n, 1) for n in linears]
        name = _fused_name([str(w.target) for w in weights])
        attrs = [new_attr(gm, f"{name}_weight", torch.cat([_tensor(gm, n, 1) for n in linears]), first)]
        attrs[0].meta["fused_from"] = [w.target for w in weights]  # passes/quantize.py: pre-quantized parts
        if has_bias:
            attrs.append(new_attr(gm, f"{name}_bias", torch.cat([_tensor(gm, n, 2) for n in linears]), first))
        with graph.inserting_before(first):
            fused = call(graph, aten.linear.default, (first.args[0], *attrs), first)
            start = 0
            for node in linears:
                width = _tensor(gm, node, 1).shape[0]
                part = call(graph, aten.slice.Tensor, (fused, -1, start, start + width), node)
                start += width
                node.replace_all_uses_with(part)
        for node in linears:
            old = [a for a in node.args[1:3] if isinstance(a, fx.Node)]
            graph.erase_node(node)
            for attr in old:
                drop_attr(gm, attr)
