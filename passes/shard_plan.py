"""Which linears of a captured graph can be split across tensor-parallel ranks, found from the graph alone.

Every linear starts as a candidate for column parallelism (its output features split across ranks). The split is
followed forward through the graph: each value derived from a split output carries the dimension that is split
(views, transposes, rope's slices and concatenations, per-head norms and the paged attention keep it somewhere
known). A linear that contracts over a split dimension is row-parallel: it gets the matching input columns and an
all-reduce after it. Wherever the split would change the math (a reduction or concatenation across the split
dimension, an operand holding the whole dimension, the graph output), the linears it came from stay whole on
every rank, and the search starts again. What remains is provably the same computation, only partitioned; a
linear the analysis cannot follow is replicated, never wrong.

A column linear whose output is carved by `split` / `chunk` / `slice` along its features (fused q/k/v, gate/up)
is split per segment, so each rank gets its share of every segment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from .base import is_op, op_name

Segment = tuple[fx.Node, int]  # (column linear, index of the segment of its output features)

_SAME = {"contiguous", "clone", "alias", "detach", "to", "_to_copy", "type_as", "lift_fresh_copy"}
_REDUCE = {"mean", "sum", "amax", "amin", "var", "softmax", "_softmax", "log_softmax", "_log_softmax"}


class _Unsplittable(Exception):
    """A split value meets an op that would need the whole dimension; its origins must stay whole."""

    def __init__(self, origins: frozenset[Segment]) -> None:
        super().__init__()
        self.origins = origins


def linear_parts(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node | None, int] | None:
    """(input, weight, bias, the weight's output-feature dim) of a linear over a parameter weight, else None.

    `linear(x, W[out, in], b)` as nn.Linear exports; `addmm(b, x, W[in, out])` / `mm(x, W)` as GPT-2's Conv1D does.
    """
    if is_op(node, "linear"):
        x, w, b = _args(node)[0], _args(node)[1], _args(node)[2] if len(_args(node)) > 2 else None
        out_dim = 0
    elif is_op(node, "addmm"):
        b, x, w = _args(node)[:3]
        out_dim = 1
    elif is_op(node, "mm"):
        (x, w), b, out_dim = _args(node)[:2], None, 1
    else:
        return None
    if not (isinstance(x, fx.Node) and isinstance(w, fx.Node) and w.op == "get_attr"):
        return None
    if b is not None and not (isinstance(b, fx.Node) and b.op == "get_attr"):
        return None
    return x, w, b, out_dim


def _args(node: fx.Node) -> Any:
    """A node's arguments, as the ops this analysis knows them (fx types them too loosely to index)."""
    return node.args


def _val(node: object) -> torch.Tensor | None:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _ndim(node: object) -> int:
    v = _val(node)
    return v.dim() if v is not None else -1


def _features(node: fx.Node) -> int:
    v = _val(node)
    assert v is not None
    return int(v.shape[-1])


@dataclass
class ShardPlan:
    """The analysis' result: what to split and how every split value is laid out."""

    columns: dict[fx.Node, list[tuple[int, int]]]  # column linear -> its segments' [start, end) in output features
    rows: list[fx.Node]  # linears contracting over a split dimension
    split: dict[fx.Node, tuple[int, frozenset[Segment]]]  # value -> (its split dim, the segments it comes from)
    carvers: dict[fx.Node, fx.Node]  # split/chunk/slice node -> the column linear whose segments it separates
    attention_kv: dict[Segment, fx.Node] = field(default_factory=dict)  # K/V segments -> their attention node
    replicated: list[fx.Node] = field(default_factory=list)  # candidate linears that stay whole


def _carve(linear: fx.Node) -> tuple[list[tuple[int, int]], list[fx.Node]]:
    """The segments a column linear's output is carved into, and the carving nodes (one segment, none if not)."""
    width, value = _features(linear), linear
    while len(value.users) == 1 and is_op(next(iter(value.users)), "view", "reshape", "_unsafe_view"):
        nxt = next(iter(value.users))
        if _ndim(nxt) < 1 or _features(nxt) != width:
            break
        value = nxt
    users, last = list(value.users), _ndim(value) - 1
    if not users or last < 0:
        return [(0, width)], []
    first = users[0]
    if len(users) == 1 and is_op(first, "split", "split_with_sizes", "chunk") and _args(first)[2] % (last + 1) == last:
        sizes = _args(first)[1]
        if is_op(first, "chunk"):
            sizes = [width // int(sizes)] * int(sizes) if width % int(sizes) == 0 else None
        elif isinstance(sizes, int):
            sizes = [sizes] * (width // sizes) if width % sizes == 0 else None
        if sizes:
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            return [(s, s + n) for s, n in zip(starts, sizes)], [first]
    if all(is_op(u, "slice") and _args(u)[1] % (last + 1) == last for u in users):
        bounds = sorted((int(_args(u)[2]), min(int(_args(u)[3]), width)) for u in users)
        if bounds[0][0] == 0 and bounds[-1][1] == width and all(a[1] == b[0] for a, b in zip(bounds, bounds[1:])):
            return bounds, users
    return [(0, width)], []


def _view_dim(src: torch.Tensor, out: torch.Tensor, dim: int) -> int | None:
    """Where dim `dim` of `src` goes in a reshape to `out`: the output dim at the same flat offset, when it is the
    split dim's outer factor or merges it with inner dims (a rank's block stays one block); else None. Sizes may be
    symbolic (the token count): offsets compare as the product of the static sizes and the symbols' names."""

    def offset(sizes: tuple) -> tuple[int, tuple[str, ...]]:
        symbols = tuple(sorted(str(s) for s in sizes if isinstance(s, torch.SymInt)))
        return math.prod(int(s) for s in sizes if not isinstance(s, torch.SymInt)), symbols

    before = offset(tuple(src.shape[:dim]))
    size = src.shape[dim]
    for j in range(out.dim()):
        got = out.shape[j]
        if got == 1 and size != 1:  # a unit dim at the same offset holds nothing of the split dim
            continue
        if offset(tuple(out.shape[:j])) != before or isinstance(size, torch.SymInt) or isinstance(got, torch.SymInt):
            continue
        if int(size) % int(got) == 0 or int(got) % int(size) == 0:
            return j
    return None


def _dims(arg: Any, ndim: int) -> set[int]:
    if arg is None:
        return set(range(ndim))
    return {int(d) % ndim for d in (arg if isinstance(arg, (list, tuple)) else [arg])}


def _reduced_dim(node: fx.Node, name: str, dim: int, ndim: int) -> int:
    """The split dim after a reduction over other dims (it keeps its place under keepdim or softmax)."""
    if name == "layer_norm":
        reduced = set(range(ndim - len(_args(node)[1]), ndim))
        keep = True
    else:
        reduced = _dims(_args(node)[1] if len(_args(node)) > 1 else node.kwargs.get("dim"), ndim)
        keep = "softmax" in name or bool(_args(node)[2] if len(_args(node)) > 2 else node.kwargs.get("keepdim", False))
    if dim in reduced:
        raise ValueError("reduced")
    return dim if keep else dim - sum(1 for d in reduced if d < dim)


def _move(node: fx.Node, name: str, src: fx.Node, dim: int) -> int | None:
    """Where the split dim of `src` lands in `node`'s output for a layout op; None when the op needs it whole."""
    nin, nout = _ndim(src), _ndim(node)
    if name in ("view", "reshape", "_unsafe_view"):
        s, o = _val(src), _val(node)
        return _view_dim(s, o, dim) if s is not None and o is not None else None
    if name == "transpose":
        a, b = int(_args(node)[1]) % nin, int(_args(node)[2]) % nin
        return b if dim == a else a if dim == b else dim
    if name == "permute":
        return [int(p) % nin for p in _args(node)[1]].index(dim)
    if name == "unsqueeze":
        k = int(_args(node)[1]) % nout
        return dim + (k <= dim)
    if name == "squeeze":
        shape = _val(src).shape if _val(src) is not None else ()  # type: ignore[union-attr]
        removed = {d for d in _dims(_args(node)[1] if len(_args(node)) > 1 else None, nin) if shape[d] == 1}
        return None if dim in removed else dim - sum(1 for d in removed if d < dim)
    if name == "select":
        k = int(_args(node)[1]) % nin
        return None if k == dim else dim - (k < dim)
    if name == "slice":
        k = int(_args(node)[1]) % nin
        v = _val(src)
        whole = v is not None and _args(node)[2:3] in ([], [0], [None]) and int(_args(node)[3]) >= int(v.shape[k])
        return dim if k != dim or whole else None
    if name == "expand":
        return dim + nout - nin
    if name in _SAME or name in ("split", "split_with_sizes", "chunk", "getitem"):
        if name in ("split", "split_with_sizes", "chunk") and int(_args(node)[2]) % nin == dim:
            return None
        return dim
    return None


def _pointwise(node: fx.Node, split: dict[fx.Node, tuple[int, frozenset[Segment]]]) -> int | None:
    """The split dim of a pointwise op's output: split operands must agree (counted from the right, as broadcasting
    aligns them) and whole operands must broadcast along it."""
    target = node.target
    if not (isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags):
        return None
    from_end = {split[a][0] - _ndim(a) for a in node.all_input_nodes if a in split}
    if len(from_end) != 1:
        return None
    (k,) = from_end
    for a in node.all_input_nodes:
        v = _val(a)
        if a not in split and v is not None and v.dim() + k >= 0 and v.shape[v.dim() + k] != 1:
            return None
    return _ndim(node) + k


def _step(node: fx.Node, plan: ShardPlan) -> tuple[int, frozenset[Segment]] | None:
    """The split layout of `node`'s output, None when it is whole; raises _Unsplittable when it cannot be split."""
    split = plan.split
    ins = [a for a in node.all_input_nodes if a in split]
    origins = frozenset().union(*(split[a][1] for a in ins))
    name = op_name(node).split(".")[-1]
    src = ins[0]
    dim = split[src][0]
    if node in plan.carvers:  # separates a column linear's segments: each piece comes from one segment
        linear = plan.carvers[node]
        if name == "slice":
            width, bounds = _features(linear), plan.columns[linear]
            index = bounds.index((int(_args(node)[2]), min(int(_args(node)[3]), width)))
            return dim, frozenset({(linear, index)})
        return dim, origins
    if name == "getitem" and src in plan.carvers:
        return dim, frozenset({(plan.carvers[src], int(_args(node)[1]))})
    if name == "sym_size":
        if int(_args(node)[1]) % _ndim(src) == dim:
            raise _Unsplittable(origins)
        return None
    if name == "paged_attention":  # [T, heads, D] each: split by heads, or one KV head that every rank keeps
        q, k, v = _args(node)[:3]

        def by_heads(t: fx.Node) -> bool:
            return t in split and split[t][0] == 1

        def one_head(t: fx.Node) -> bool:
            return t not in split and _val(t) is not None and _val(t).shape[1] == 1  # type: ignore[union-attr]

        astray = [t for t in (k, v) if t in split and not by_heads(t)]
        if astray:  # split on another dim (a single head's features): keep that projection whole first
            raise _Unsplittable(frozenset().union(*(split[t][1] for t in astray)))
        if not (by_heads(q) and all(by_heads(t) or one_head(t) for t in (k, v))):
            raise _Unsplittable(origins)
        for t in (k, v):
            for seg in split[t][1] if t in split else ():
                plan.attention_kv[seg] = node
        return 1, split[q][1]
    if name == "cat":
        tensors, k = _args(node)[0], int(_args(node)[1] if len(_args(node)) > 1 else 0) % _ndim(node)
        if k == dim or any(t not in split or split[t][0] != dim for t in tensors):
            raise _Unsplittable(origins)
        return dim, origins
    if name in _REDUCE or name == "layer_norm":
        if len(ins) != 1 or _args(node)[0] is not src:
            raise _Unsplittable(origins)
        try:
            return _reduced_dim(node, name, dim, _ndim(src)), origins
        except ValueError:
            raise _Unsplittable(origins) from None
    moved = _move(node, name, src, dim) if len(ins) == 1 and _args(node)[0] is src else None
    if moved is None:
        moved = _pointwise(node, split)
    if moved is None:
        raise _Unsplittable(origins)
    return moved, origins


def _propagate(graph: fx.Graph, candidates: set[fx.Node]) -> ShardPlan:
    plan = ShardPlan(columns={}, rows=[], split={}, carvers={})
    for linear in candidates:
        plan.columns[linear], carvers = _carve(linear)
        plan.carvers.update({c: linear for c in carvers})
    for node in graph.nodes:
        if node.op == "output":
            outs = [a for a in node.all_input_nodes if a in plan.split]
            if outs:
                raise _Unsplittable(frozenset().union(*(plan.split[a][1] for a in outs)))
        if node.op != "call_function":
            continue
        parts = linear_parts(node)
        if parts is not None and parts[0] in plan.split:
            dim, origins = plan.split[parts[0]]
            if dim != _ndim(parts[0]) - 1:
                raise _Unsplittable(origins)
            plan.rows.append(node)
        elif node in plan.columns:
            plan.split[node] = (_ndim(node) - 1, frozenset((node, i) for i in range(len(plan.columns[node]))))
        elif any(a in plan.split for a in node.all_input_nodes):
            layout = _step(node, plan)
            if layout is not None:
                plan.split[node] = layout
    return plan


def analyse(graph: fx.Graph, candidates: set[fx.Node]) -> ShardPlan:
    """Split what can be split: drop the candidates whose split reaches an op that needs them whole, until none
    does. A column candidate that no row-parallel linear closes (its split would reach the output) is dropped too."""
    candidates, replicated = set(candidates), []
    while True:
        try:
            plan = _propagate(graph, candidates)
        except _Unsplittable as lost:
            dropped = {linear for linear, _ in lost.origins}
            replicated += sorted(dropped, key=lambda n: n.name)
            candidates -= dropped
            continue
        for row in plan.rows:  # contracting over a split: its output features stay whole
            del plan.columns[row]
        plan.replicated = replicated
        return plan
