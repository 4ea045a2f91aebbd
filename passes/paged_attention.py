"""Paged-attention rewrite: every attention of the captured graph becomes `kiln::paged_attention`.

Two forms are recognised, the ones HF models export to:
- SDPA: `aten.scaled_dot_product_attention(q, k, v, mask, scale=...)`, with K/V either GQA-packed or expanded
  by `repeat_kv` (unsqueeze, expand, reshape), which is undone so the cache holds only the KV heads;
- eager: `matmul(q, kᵀ)`, then scaling, optional tanh soft-capping, the mask add, softmax, casts, and
  `matmul(p, v)`.
The rewrite adds the KV caches and the step's attention metadata as graph inputs; the mask construction it
no longer needs dies in the final cleanup.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

import kiln.ops  # noqa: F401  (declares kiln::paged_attention)
from kiln.ops.metadata import AttentionMetadata

from .base import GraphPass, PassContext, is_op

aten = torch.ops.aten


class UnsupportedAttentionError(ValueError):
    """An attention form the rewrite does not understand; compiling it silently would give wrong tokens."""


def _strip_repeat_kv(node: fx.Node) -> fx.Node:
    """`reshape(expand(unsqueeze(x, 2)))` is HF's repeat_kv: attend over x's KV heads directly instead."""
    if is_op(node, "reshape", "view", "_unsafe_view"):
        expand = node.args[0]
        if is_op(expand, "expand") and is_op(expand.args[0], "unsqueeze") and expand.args[0].args[1] == 2:
            return expand.args[0].args[0]
    return node


def _head_dim(node: fx.Node) -> int:
    return int(node.meta["val"].shape[-1])


def _match_sdpa(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node, float, float] | None:
    if not is_op(node, "scaled_dot_product_attention"):
        return None
    q, k, v = node.args[:3]
    if len(node.args) > 4 and node.args[4] not in (0, 0.0):
        raise UnsupportedAttentionError("attention dropout is on: export the model in eval mode")
    scale = node.kwargs.get("scale")
    if scale is None:
        scale = 1.0 / math.sqrt(_head_dim(q))
    return q, _strip_repeat_kv(k), _strip_repeat_kv(v), float(scale), 0.0


def _through_casts(node: fx.Node) -> fx.Node:
    while is_op(node, "to", "_to_copy", "dropout", "type_as", "alias"):
        node = node.args[0]
    return node


def _match_eager(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node, float, float] | None:
    """Match `matmul(softmax(f(matmul(q, kᵀ))), v)` where f is scaling, soft-capping and a mask add."""
    if not is_op(node, "matmul", "bmm"):
        return None
    probs, v = node.args
    softmax = _through_casts(probs)
    if not is_op(softmax, "softmax", "_softmax"):
        return None
    scale, softcap, x = 1.0, 0.0, _through_casts(softmax.args[0])
    while not is_op(x, "matmul", "bmm"):
        if is_op(x, "add") and isinstance(x.args[1], fx.Node):
            x = x.args[0]  # the additive mask: causality and windows come from the cache metadata now
        elif is_op(x, "mul") and isinstance(x.args[1], (int, float)):
            if is_op(x.args[0], "tanh"):
                softcap = float(x.args[1])
                inner = x.args[0].args[0]
                if not (is_op(inner, "div") and inner.args[1] == softcap):
                    raise UnsupportedAttentionError(f"unrecognised soft-capping around {inner}")
                x = inner.args[0]
            else:
                scale *= float(x.args[1])
                x = x.args[0]
        elif is_op(x, "div") and isinstance(x.args[1], (int, float)):
            scale /= float(x.args[1])
            x = x.args[0]
        elif is_op(x, "to", "_to_copy"):
            x = x.args[0]
        else:
            raise UnsupportedAttentionError(f"unrecognised op {x} between attention scores and softmax")
    q, kt = x.args
    if not is_op(kt, "transpose") or sorted(a % 4 for a in kt.args[1:]) != [2, 3]:
        raise UnsupportedAttentionError(f"attention scores do not read a transposed key: {kt}")
    return q, _strip_repeat_kv(kt.args[0]), _strip_repeat_kv(v), scale, softcap


def _to_tokens_major(graph: fx.Graph, x: fx.Node) -> fx.Node:
    """[1, H, T, D] -> [T, H, D]."""
    return graph.call_function(aten.transpose.int, (graph.call_function(aten.select.int, (x, 0, 0)), 0, 1))


class PagedAttention(GraphPass):
    name = "paged_attention"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> dict[str, int]:
        graph = gm.graph
        matches = []
        for node in graph.nodes:
            m = _match_sdpa(node) or _match_eager(node)
            if m is not None:
                matches.append((node, m))
        windows = ctx.layer_windows
        if matches and len(windows) != len(matches):
            raise UnsupportedAttentionError(
                f"found {len(matches)} attentions in the graph but the config has {len(windows)} layers"
            )
        last_input = [n for n in graph.nodes if n.op == "placeholder"][-1]
        names = AttentionMetadata.input_names()
        caches = [f"{kind}_cache_{i}" for i in range(len(matches)) for kind in ("k", "v")]
        with graph.inserting_before(last_input.next):
            new = {name: graph.placeholder(name) for name in names + caches}
        meta = [new[n] for n in names[:4]]
        ctx.state["logits_indices"] = new["logits_indices"]
        kv_shapes = []
        for layer, (node, (q, k, v, scale, softcap)) in enumerate(matches):
            with graph.inserting_before(node):
                args = [_to_tokens_major(graph, t) for t in (q, k, v)]
                attn = graph.call_function(
                    torch.ops.kiln.paged_attention.default,
                    (*args, new[f"k_cache_{layer}"], new[f"v_cache_{layer}"], *meta, scale, windows[layer], softcap),
                )
                out = graph.call_function(aten.unsqueeze.default, (graph.call_function(aten.transpose.int, (attn, 0, 1)), 0))
            node.replace_all_uses_with(out)
            graph.erase_node(node)
            kv_shapes.append((int(k.meta["val"].shape[1]), _head_dim(k), _head_dim(v)))
        ctx.state["kv_shapes"] = kv_shapes
        return {"matched": len(matches), "cache_inputs": len(caches)}
