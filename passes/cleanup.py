"""Cleanup: drop what export leaves behind that computes nothing for inference.

Runtime asserts and guards, dropout in eval mode, aliases, casts and views that do not change anything, and
everything that becomes dead once they are gone (notably the causal-mask construction after the
paged-attention rewrite). It runs first and again as the fixed final pass.
"""

from __future__ import annotations

import torch
from torch import fx

from .base import GraphPass, PassContext, is_op

_ASSERTS = {
    "_assert_tensor_metadata",
    "_assert_scalar",
    "_assert_async",
    "sym_constrain_range",
    "sym_constrain_range_for_size",
    "_functional_assert_async",
}


def _val(node: object) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _is_assert(node: fx.Node) -> bool:
    """A runtime check export leaves in the graph: the guards submodule or an assert op."""
    if node.op == "call_module":
        return node.target == "_guards_fn"
    return node.op == "call_function" and getattr(node.target, "__name__", "").split(".")[0] in _ASSERTS


def _is_noop(node: fx.Node) -> bool:
    """A call whose output is its first input: eval-mode dropout, alias, same-dtype cast, same-shape view."""
    if is_op(node, "dropout"):
        return len(node.args) > 2 and node.args[2] is False or node.kwargs.get("train") is False
    if is_op(node, "alias", "clone", "contiguous"):  # but a collective needs its input dense (torch 2.11, NCCL)
        return not any(getattr(user.target, "namespace", None) == "_c10d_functional" for user in node.users)
    src, out = _val(node.args[0]) if node.args else None, _val(node)
    if src is None or out is None:
        return False
    if is_op(node, "to", "_to_copy", "type_as"):
        return src.dtype == out.dtype and src.device == out.device
    if is_op(node, "view", "reshape", "_unsafe_view", "expand"):
        return list(src.shape) == list(out.shape)
    return False


class Cleanup(GraphPass):
    name = "cleanup"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> dict[str, int]:
        asserts = noops = 0
        for node in list(gm.graph.nodes):
            if _is_assert(node):
                gm.graph.erase_node(node)
                asserts += 1
            elif node.op == "call_function" and _is_noop(node):
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                noops += 1
        before = len(gm.graph.nodes)
        gm.graph.eliminate_dead_code()
        dead = before - len(gm.graph.nodes)
        unused = _drop_unused_attributes(gm)
        return {"asserts": asserts, "noops": noops, "dead": dead, "unused_attrs": unused}


def _drop_unused_attributes(gm: fx.GraphModule) -> int:
    """Remove get_attr targets nothing reads any more (buffers of dead mask or rope code)."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    dropped = 0
    for name, _ in list(gm.named_buffers()) + list(gm.named_parameters()):
        if name not in used:
            module_path, _, attr = name.rpartition(".")
            owner = gm.get_submodule(module_path) if module_path else gm
            delattr(owner, attr)
            dropped += 1
    return dropped
