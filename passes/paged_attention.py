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
from torch import fx
from torch.fx.node import Argument

import kiln.ops  # noqa: F401  (declares kiln::paged_attention)
from kiln.ops.metadata import AttentionMetadata

from .base import GraphPass, PassContext, is_op
from .pattern import CASTS, strip_casts

aten = torch.ops.aten
_PASS_THROUGH = ("dropout", "alias")  # around the softmax besides casts: no-ops in eval mode


class UnsupportedAttentionError(ValueError):
    """An attention form the rewrite does not understand; compiling it silently would give wrong tokens."""


def _node(arg: Argument, what: str) -> fx.Node:
    if not isinstance(arg, fx.Node):
        raise UnsupportedAttentionError(f"attention {what} is {arg!r}, not a tensor of the graph")
    return arg


def _strip_repeat_kv(arg: Argument) -> fx.Node:
    """`reshape(expand(unsqueeze(x, 2)))` is HF's repeat_kv: attend over x's KV heads directly instead."""
    node = _node(arg, "key/value")
    if is_op(node, "reshape", "view", "_unsafe_view"):
        expand = node.args[0]
        if is_op(expand, "expand"):
            unsqueeze = expand.args[0]
            if is_op(unsqueeze, "unsqueeze") and unsqueeze.args[1] == 2:
                return _node(unsqueeze.args[0], "key/value")
    return node


def _head_dim(node: fx.Node) -> int:
    return int(node.meta["val"].shape[-1])


def _match_sdpa(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node, float, float] | None:
    if not is_op(node, "scaled_dot_product_attention"):
        return None
    q, k, v = (_node(a, "input") for a in node.args[:3])
    if len(node.args) > 4 and node.args[4] not in (0, 0.0):
        raise UnsupportedAttentionError("attention dropout is on: export the model in eval mode")
    scale = node.kwargs.get("scale")
    if scale is None:
        scale = 1.0 / math.sqrt(_head_dim(q))
    assert isinstance(scale, (int, float))
    return q, _strip_repeat_kv(k), _strip_repeat_kv(v), float(scale), 0.0


def _number(arg: Argument) -> float | None:
    return float(arg) if isinstance(arg, (int, float)) else None


def _match_eager(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node, float, float] | None:
    """Match `matmul(softmax(f(matmul(q, kᵀ))), v)` where f is scaling, soft-capping and a mask add."""
    if not is_op(node, "matmul", "bmm"):
        return None
    probs, v = node.args
    softmax = strip_casts(probs, also=_PASS_THROUGH)
    if not is_op(softmax, "softmax", "_softmax"):
        return None
    scale, softcap, x = 1.0, 0.0, strip_casts(softmax.args[0], also=_PASS_THROUGH)
    while not is_op(x, "matmul", "bmm"):
        factor = _number(x.args[1]) if is_op(x, "mul", "div") else None
        if is_op(x, "add") and isinstance(x.args[1], fx.Node):
            x = x.args[0]  # the additive mask: causality and windows come from the cache metadata now
        elif is_op(x, "mul") and factor is not None:
            tanh = x.args[0]
            if is_op(tanh, "tanh"):
                softcap = factor
                inner = tanh.args[0]
                if not (is_op(inner, "div") and inner.args[1] == softcap):
                    raise UnsupportedAttentionError(f"unrecognised soft-capping around {inner}")
                x = inner.args[0]
            else:
                scale *= factor
                x = x.args[0]
        elif is_op(x, "div") and factor is not None:
            scale /= factor
            x = x.args[0]
        elif is_op(x, *CASTS):
            x = x.args[0]
        else:
            raise UnsupportedAttentionError(f"unrecognised op {x} between attention scores and softmax")
    q, kt = _node(x.args[0], "query"), x.args[1]
    dims = kt.args[1:] if is_op(kt, "transpose") else ()
    if not is_op(kt, "transpose") or sorted(a % 4 for a in dims if isinstance(a, int)) != [2, 3]:
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
        ctx.logits_indices = new["logits_indices"]
        kv_shapes = []
        for layer, (node, (q, k, v, scale, softcap)) in enumerate(matches):
            with graph.inserting_before(node):
                args = [_to_tokens_major(graph, t) for t in (q, k, v)]
                attn = graph.call_function(
                    torch.ops.kiln.paged_attention.default,
                    (*args, new[f"k_cache_{layer}"], new[f"v_cache_{layer}"], *meta, scale, windows[layer], softcap),
                )
                out = graph.call_function(
                    aten.unsqueeze.default, (graph.call_function(aten.transpose.int, (attn, 0, 1)), 0)
                )
            node.replace_all_uses_with(out)
            graph.erase_node(node)
            kv_shapes.append((int(k.meta["val"].shape[1]), _head_dim(k), _head_dim(v)))
        ctx.kv_shapes = kv_shapes
        return {"matched": len(matches), "cache_inputs": len(caches)}
