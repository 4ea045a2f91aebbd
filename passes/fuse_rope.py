"""Rotary-embedding fusion: HF's cos/sin computation and rotate-half arithmetic become one `kiln::rope`.

HF computes cos/sin from the positions on every step (`positions * inv_freq`, scaling, cos, sin, casts) and
rotates q and k with `x * cos + rotate_half(x) * sin`, on the first rotary_dim dims only for partial rotary.
Whatever rope variant produced it, the cos/sin subgraph is a function of the positions alone, so it is
evaluated here once for every position up to the model's limit into a `cos_sin_cache` buffer; the op then
only gathers rows of it. The rewrite is refused where the subgraph is not row-wise in the positions.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx
from torch.fx.node import Argument

import kiln.ops  # noqa: F401  (declares the kiln:: ops)

from .base import GraphPass, PassContext, is_op
from .fuse_common import arg_node, aten, call, last_dim, new_attr, param

_END = 2**63 - 1


def _slice(node: Argument) -> tuple[fx.Node, int, int] | None:
    """(source, start, end) for a slice of the last dim."""
    if is_op(node, "slice") and len(node.args) == 4:
        src, dim, start, end = node.args
        if isinstance(src, fx.Node) and last_dim(src, dim) and isinstance(start, int) and isinstance(end, int):
            return src, start, end
    return None


def _mul_by(node: Argument, x: fx.Node) -> fx.Node | None:
    """The other factor of `x * c` (either order)."""
    if is_op(node, "mul") and len(node.args) == 2 and x in node.args:
        other = node.args[1] if node.args[0] is x else node.args[0]
        return other if isinstance(other, fx.Node) else None
    return None


def _pair(node: fx.Node) -> tuple[Argument, Argument] | None:
    """The two tensors of `cat([a, b], ...)`."""
    tensors = node.args[0]
    return (tensors[0], tensors[1]) if isinstance(tensors, (list, tuple)) and len(tensors) == 2 else None


def _match_rotation(node: Argument) -> tuple[fx.Node, int, fx.Node, fx.Node] | None:
    """(x, rotary_dim, cos, sin) for `x * cos + cat(-x2, x1) * sin`, optionally on x[..., :rd] with the rest
    concatenated back (partial rotary)."""
    full, rest_of = None, None
    if is_op(node, "cat") and _pair(node) is not None and last_dim(node, node.args[1] if len(node.args) > 1 else 0):
        node, rest = _pair(node) or (None, None)
        rest_of = _slice(rest)
        if rest_of is None or rest_of[2] != _END:
            return None
    if not (is_op(node, "add") and len(node.args) == 2):
        return None
    for a, b in (node.args, node.args[::-1]):
        if not is_op(b, "mul") or not any(is_op(f, "cat") for f in b.args):
            continue
        halves = next(f for f in b.args if is_op(f, "cat"))
        assert isinstance(halves, fx.Node)
        sin = _mul_by(b, halves)
        neg, low = _pair(halves) or (None, None)
        if not is_op(neg, "neg") or _slice(neg.args[0]) is None or _slice(low) is None:
            continue
        x, h, end = _slice(neg.args[0]) or (None, 0, 0)
        if x is None or _slice(low) != (x, 0, h) or end not in (_END, 2 * h):
            continue
        cos = _mul_by(a, x)
        if cos is None or sin is None:
            continue
        if rest_of is not None:
            full_src = _slice(x)
            if full_src is None or full_src[1] != 0 or full_src[2] != 2 * h or rest_of[:2] != (full_src[0], 2 * h):
                return None
            full, x = full_src[0], full_src[0]
        return (full or x), 2 * h, cos, sin
    return None


def _trace_back(node: fx.Node) -> fx.Node:
    """Through paged_attention's [1, H, T, D] -> [T, H, D] views to the tensor the model computed."""
    if is_op(node, "transpose"):
        select = node.args[0]
        if is_op(select, "select") and isinstance(select.args[0], fx.Node):
            return select.args[0]
    return node


def _evaluate(
    gm: fx.GraphModule, targets: list[fx.Node], positions: fx.Node, pos: torch.Tensor
) -> list[torch.Tensor] | None:
    """Run the subgraph computing `targets` with `positions` = pos; None if it reads any other input."""
    needed, stack = set(), list(targets)
    while stack:
        n = stack.pop()
        if n not in needed:
            needed.add(n)
            stack.extend(n.all_input_nodes)
    env: dict[fx.Node, Any] = {}
    for n in gm.graph.nodes:
        if n not in needed:
            continue
        if n.op == "placeholder":
            if n is not positions:
                return None
            env[n] = pos
        elif n.op == "get_attr":
            env[n] = param(gm, n)
        elif n.op == "call_function" and not is_op(n, "sym_size"):
            args, kwargs = fx.node.map_arg((n.args, n.kwargs), env.__getitem__)
            assert callable(n.target) and isinstance(args, tuple) and isinstance(kwargs, dict)
            env[n] = n.target(*args, **kwargs)
        else:
            return None
    return [env[t] for t in targets]


def _cos_sin_cache(
    gm: fx.GraphModule, cos: fx.Node, sin: fx.Node, positions: fx.Node, max_pos: int, rd: int
) -> torch.Tensor | None:
    """[max_pos, rd] float32 (cos half then sin half), or None if not computable row-wise from positions."""
    with torch.no_grad():
        full = _evaluate(gm, [cos, sin], positions, torch.arange(max_pos))
        probe = torch.tensor([max_pos - 1, 0, max_pos // 2])
        some = _evaluate(gm, [cos, sin], positions, probe)
    if full is None or some is None or any(t.numel() != max_pos * rd for t in full):
        return None
    c, s = (t.reshape(max_pos, rd) for t in full)
    rows_ok = all(torch.equal(t.reshape(3, rd), f[probe]) for t, f in zip(some, (c, s)))
    h = rd // 2
    if not rows_ok or not torch.equal(c[:, :h], c[:, h:]) or not torch.equal(s[:, :h], s[:, h:]):
        return None
    return torch.cat([c[:, :h], s[:, :h]], -1).float()


class FuseRope(GraphPass):
    name = "fuse_rope"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> dict[str, int]:
        graph = gm.graph
        positions = next((n for n in graph.nodes if n.op == "placeholder" and n.target == "positions"), None)
        config = ctx.config
        max_pos = int(getattr(config, "max_position_embeddings", 0) or getattr(config, "n_positions", 0) or 4096)
        caches: list[tuple[torch.Tensor, fx.Node]] = []  # one buffer per distinct table (layers share it)
        matched = 0
        for attn in [n for n in graph.nodes if is_op(n, "paged_attention")]:
            q_rot, k_rot = (_trace_back(arg_node(attn, i)) for i in (0, 1))
            mq, mk = _match_rotation(q_rot), _match_rotation(k_rot)
            if positions is None or mq is None or mk is None or mq[1:] != mk[1:]:
                continue
            (q, rd, cos, sin), k = mq, mk[0]
            table = _cos_sin_cache(gm, cos, sin, positions, max_pos, rd)
            if table is None:
                continue
            cache = next((node for t, node in caches if torch.equal(t, table)), None)
            if cache is None:
                cache = new_attr(gm, f"rope_cos_sin_cache_{len(caches)}", table, attn, buffer=True)
                caches.append((table, cache))
            order = {n: i for i, n in enumerate(graph.nodes)}
            with graph.inserting_before(max(q_rot, k_rot, key=order.__getitem__).next):
                qt, kt = (
                    call(graph, aten.transpose.int, (call(graph, aten.select.int, (t, 0, 0), attn), 0, 1), attn)
                    for t in (q, k)
                )
                rope = call(graph, torch.ops.kiln.rope.default, (qt, kt, positions, cache, rd, True), attn)
                outs = [call(graph, operator.getitem, (rope, i), attn) for i in (0, 1)]
            for i, (rot, out) in enumerate(zip((q_rot, k_rot), outs)):
                view = arg_node(attn, i)
                if view is not rot:  # paged_attention read a [T, H, D] view of rot: read the op's output instead
                    view.replace_all_uses_with(out)
                    select = arg_node(view, 0)
                    graph.erase_node(view)
                    if not select.users:
                        graph.erase_node(select)
                if rot.users:
                    with graph.inserting_before(out.next):
                        rot.replace_all_uses_with(
                            call(
                                graph,
                                aten.unsqueeze.default,
                                (call(graph, aten.transpose.int, (out, 0, 1), attn), 0),
                                attn,
                            )
                        )
            matched += 1
        graph.eliminate_dead_code()
        return {"matched": matched, "caches": len(caches)}
