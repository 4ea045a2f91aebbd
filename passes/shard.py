"""Tensor parallelism as a graph rewrite: this rank's share of every weight, and the collectives the math needs.

`shard_plan.analyse` finds the column-parallel linears (q/k/v, gate/up, fused or not: split by output features,
per segment) and the row-parallel ones that close them (attention output, down projection: split by input
features, then an all-reduce). KV heads follow the query heads they serve: with fewer KV heads than ranks each
rank keeps the one its query heads read (replicated across the ranks that share it). The embedding and the LM
head are split by vocabulary (padded to a multiple of the ranks): a masked lookup plus an all-reduce, and an
all-gather of the logits. Collectives are `torch.distributed`'s functional ops over the named process group, so
the generated forward shows them. Every rank runs this same pass with its own rank.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch._guards import detect_fake_mode

from .base import VIEW_OPS, GraphPass, PassContext, is_op
from .fuse_common import infer_val, param
from .shard_plan import ShardPlan, analyse, linear_parts

aten = torch.ops.aten
c10d = torch.ops._c10d_functional
_SIZED = ("view", "reshape", "_unsafe_view", "expand")


@dataclass(frozen=True)
class ShardSpec:
    """Which rank this graph is for, of how many, and the process group its collectives run over."""

    rank: int
    size: int
    group: str = "0"

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"tensor_parallel_size: rank {self.rank} of {self.size} is not a valid rank")


def _set_tensor(gm: fx.GraphModule, target: str, tensor: torch.Tensor) -> None:
    owner_path, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    if name in owner._parameters:
        owner._parameters[name] = torch.nn.Parameter(tensor.contiguous(), requires_grad=False)
    else:
        owner._buffers[name] = tensor.contiguous()


def _kinds(linears: Iterable[fx.Node]) -> dict[str, int]:
    """How many linears of each kind, named by their weight's module (`...self_attn.q_proj.weight` -> `q_proj`)."""
    names = []
    for node in linears:
        parts = linear_parts(node)
        target = str(parts[1].target).split(".") if parts else [node.name]
        names.append(target[-2] if len(target) > 1 else target[-1])
    return dict(Counter(names))


def _recarve(node: fx.Node, segments: list[tuple[int, int]], lengths: list[int], local: list[int]) -> None:
    """Point a split / chunk / slice that separates a column linear's segments at the segments' local bounds."""
    if is_op(node, "slice"):
        index = [a for a, _ in segments].index(int(node.args[2]))  # type: ignore[arg-type]
        node.args = (node.args[0], node.args[1], local[index], local[index + 1])
    else:
        node.target = aten.split_with_sizes.default
        node.args = (node.args[0], lengths, node.args[2])


def _lm_head(graph: fx.Graph, gm: fx.GraphModule, vocab: int) -> fx.Node | None:
    """The last linear producing `vocab` features: the one the logits come from."""
    heads = []
    for node in graph.nodes:
        parts = linear_parts(node)
        weight = param(gm, parts[1]) if parts else None
        if parts and weight is not None and weight.shape[parts[3]] == vocab:
            heads.append(node)
    return heads[-1] if heads else None


class ShardTensorParallel(GraphPass):
    name = "shard"

    def __init__(self, spec: ShardSpec) -> None:
        self.spec = spec

    def _collective(self, graph: fx.Graph, op: Any, x: fx.Node, *args: Any) -> fx.Node:
        return graph.call_function(c10d.wait_tensor.default, (graph.call_function(op, (x, *args, self.spec.group)),))

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> dict[str, int]:
        graph, size = gm.graph, self.spec.size
        graph.eliminate_dead_code()
        _refresh_values(gm)  # the attention rewrite's layout nodes carry none yet
        vocab = int(ctx.config.vocab_size)
        head = _lm_head(graph, gm, vocab)
        uses = Counter(str(n.target) for n in graph.nodes if n.op == "get_attr" for _ in n.users)
        candidates = set()
        for node in graph.nodes:
            parts = linear_parts(node)
            if parts and node is not head and uses[str(parts[1].target)] == 1:
                candidates.add(node)
        plan = analyse(graph, candidates)
        divisor = self._divisors(graph, plan, ctx)
        self._check_sizes(plan, divisor)
        for linear, segments in plan.columns.items():
            carvers = [c for c, owner in plan.carvers.items() if owner is linear]
            self._split_column(gm, linear, segments, carvers, divisor)
        self._resize(plan, divisor)
        for row in plan.rows:
            self._split_row(gm, row, plan, divisor)
        gathers = self._split_vocab(gm, head, vocab)
        _refresh_values(gm)
        ctx.sharding = {
            "size": size,
            "column": _kinds(plan.columns),
            "row": _kinds(plan.rows),
            "replicated": _kinds(plan.replicated),
            "kv_heads_per_rank": sorted({shape[0] for shape in ctx.kv_shapes}),
        }
        reduces = sum(1 for n in graph.nodes if n.target == c10d.all_reduce.default)
        return {
            "column_linears": len(plan.columns),
            "row_linears": len(plan.rows),
            "replicated_linears": len(plan.replicated),
            "all_reduce": reduces,
            "all_gather": gathers,
        }

    def _divisors(self, graph: fx.Graph, plan: ShardPlan, ctx: PassContext) -> dict[Any, int]:
        """Into how many parts each segment is cut: the rank count, or the KV head count when it is smaller (a KV
        head is then kept whole by each rank whose query heads read it). Also sets the caches' per-rank heads."""
        size = self.spec.size
        attentions = [n for n in graph.nodes if is_op(n, "paged_attention")]
        divisor: dict[Any, int] = {}
        sharded_layers = set()
        for segment, attention in plan.attention_kv.items():
            layer = attentions.index(attention)
            kv_heads = ctx.kv_shapes[layer][0]
            if kv_heads % size and size % kv_heads:
                raise ValueError(
                    f"tensor_parallel_size={size}: layer {layer} has {kv_heads} KV heads; the rank count must divide "
                    "them or be a multiple of them"
                )
            divisor[segment] = min(kv_heads, size)
            sharded_layers.add(layer)
        ctx.kv_shapes = [
            (max(kv // size, 1), d, dv) if layer in sharded_layers else (kv, d, dv)
            for layer, (kv, d, dv) in enumerate(ctx.kv_shapes)
        ]
        return divisor

    def _check_sizes(self, plan: ShardPlan, divisor: dict[Any, int]) -> None:
        size = self.spec.size
        for node, (dim, origins) in plan.split.items():
            value = node.meta["val"]
            if not isinstance(value, torch.Tensor):  # a split's pieces: each is checked as its getitem
                continue
            parts = {divisor.get(s, size) for s in origins}
            full = value.shape[dim]
            if len(parts) != 1 or int(full) % parts.pop():
                raise ValueError(
                    f"tensor_parallel_size={size}: {node.name} has {full} along the dimension it would be split on, "
                    "which the ranks cannot share evenly"
                )

    def _block(self, parts: int) -> int:
        """Which of `parts` blocks this rank holds."""
        return self.spec.rank * parts // self.spec.size

    def _split_column(
        self,
        gm: fx.GraphModule,
        linear: fx.Node,
        segments: list[tuple[int, int]],
        carvers: list[fx.Node],
        divisor: dict[Any, int],
    ) -> None:
        _, weight, bias, out_dim = linear_parts(linear)  # type: ignore[misc]
        lengths = [(b - a) // divisor.get((linear, i), self.spec.size) for i, (a, b) in enumerate(segments)]
        starts = [a + self._block((b - a) // n) * n for (a, b), n in zip(segments, lengths)]
        for node, dim in ((weight, out_dim), (bias, 0)):
            tensor = param(gm, node)
            if node is not None and tensor is not None:
                pieces = [tensor.narrow(dim, s, n) for s, n in zip(starts, lengths)]
                _set_tensor(gm, str(node.target), torch.cat(pieces, dim))
        local = [sum(lengths[:i]) for i in range(len(lengths) + 1)]
        for carver in carvers:
            _recarve(carver, segments, lengths, local)

    def _resize(self, plan: ShardPlan, divisor: dict[Any, int]) -> None:
        """Views and expands inside the split region state the split dim's size: give them this rank's."""
        size = self.spec.size
        for node, (dim, origins) in plan.split.items():
            if is_op(node, *_SIZED) and isinstance(node.args[1], (list, tuple)):
                parts = divisor.get(next(iter(origins)), size)
                shape = list(node.args[1])
                if isinstance(shape[dim], int) and shape[dim] > 0:
                    shape[dim] //= parts
                    node.args = (node.args[0], shape, *node.args[2:])

    def _split_row(self, gm: fx.GraphModule, row: fx.Node, plan: ShardPlan, divisor: dict[Any, int]) -> None:
        """Keep this rank's input columns, sum the partial products over ranks, then add the bias once."""
        x, weight, bias, out_dim = linear_parts(row)  # type: ignore[misc]
        size = self.spec.size
        if any(divisor.get(s, size) != size for s in plan.split[x][1]):
            raise ValueError(f"tensor_parallel_size={size}: {row.name} reads KV-head-replicated values")
        tensor = param(gm, weight)
        assert tensor is not None
        in_dim = 1 - out_dim
        width = tensor.shape[in_dim] // size
        _set_tensor(gm, str(weight.target), tensor.narrow(in_dim, self._block(size) * width, width))
        row.target, row.args = (
            (aten.linear.default, (x, weight)) if is_op(row, "linear") else (aten.mm.default, (x, weight))
        )
        graph = gm.graph
        with graph.inserting_before(row.next):
            reduced = self._collective(graph, c10d.all_reduce.default, row, "sum")
        out = reduced
        if bias is not None:
            with graph.inserting_before(reduced.next):
                out = graph.call_function(aten.add.Tensor, (reduced, bias))
        row.replace_all_uses_with(out, delete_user_cb=lambda user: user is not reduced.args[0])

    def _split_vocab(self, gm: fx.GraphModule, head: fx.Node | None, vocab: int) -> int:
        """Embedding rows and LM head rows by vocabulary; returns the all-gathers added (the logits')."""
        graph, size = gm.graph, self.spec.size
        padded = -(-vocab // size) * size
        share = padded // size
        start = self.spec.rank * share
        done: set[str] = set()

        def shard(node: fx.Node, dim: int) -> None:
            tensor = param(gm, node)
            if tensor is None or str(node.target) in done:
                return
            done.add(str(node.target))
            if padded != vocab:
                pad = list(tensor.shape)
                pad[dim] = padded - vocab
                tensor = torch.cat([tensor, tensor.new_zeros(pad)], dim)
            _set_tensor(gm, str(node.target), tensor.narrow(dim, start, share))

        for node in list(graph.nodes):
            weight = node.args[0] if is_op(node, "embedding") and _token_ids(node.args[1]) else None
            if isinstance(weight, fx.Node) and (t := param(gm, weight)) is not None and t.shape[0] == vocab:
                shard(weight, 0)
                self._masked_lookup(graph, node, start, share)
        if head is None:
            return 0
        _, weight, bias, out_dim = linear_parts(head)  # type: ignore[misc]
        head.meta["lm_head"] = True  # its rows are no longer the vocabulary: say what it is (quant_select reads it)
        shard(weight, out_dim)
        if bias is not None:
            shard(bias, 0)
        ndim = head.meta["val"].dim()
        with graph.inserting_before(head.next):
            first = graph.call_function(aten.permute.default, (head, [ndim - 1, *range(ndim - 1)]))
            dense = graph.call_function(aten.clone.default, (first,), {"memory_format": torch.contiguous_format})
            gathered = self._collective(graph, c10d.all_gather_into_tensor.default, dense, size)
            logits = graph.call_function(aten.permute.default, (gathered, [*range(1, ndim), 0]))
            if padded != vocab:
                logits = graph.call_function(aten.slice.Tensor, (logits, -1, 0, vocab))
        head.replace_all_uses_with(logits, delete_user_cb=lambda user: user is not first)
        return 1

    def _masked_lookup(self, graph: fx.Graph, node: fx.Node, start: int, share: int) -> None:
        """Look up the ids this rank holds, zero the others, and sum the ranks' rows."""
        ids = node.args[1]
        with graph.inserting_before(node):
            outside = graph.call_function(
                aten.logical_or.default,
                (
                    graph.call_function(aten.lt.Scalar, (ids, start)),
                    graph.call_function(aten.ge.Scalar, (ids, start + share)),
                ),
            )
            local = graph.call_function(aten.sub.Tensor, (ids, start))
            safe = graph.call_function(aten.masked_fill.Scalar, (local, outside, 0))
        node.args = (node.args[0], safe)
        with graph.inserting_before(node.next):
            mask = graph.call_function(aten.unsqueeze.default, (outside, -1))
            zeroed = graph.call_function(aten.masked_fill.Scalar, (node, mask, 0.0))
            summed = self._collective(graph, c10d.all_reduce.default, zeroed, "sum")
        node.replace_all_uses_with(summed, delete_user_cb=lambda user: user is not zeroed)


def _token_ids(arg: object) -> bool:
    """Whether an embedding's index is the graph's `input_ids` (a position embedding's is not)."""
    while isinstance(arg, fx.Node) and arg.op == "call_function" and is_op(arg, *VIEW_OPS):
        arg = arg.args[0]
    return isinstance(arg, fx.Node) and arg.op == "placeholder" and arg.name == "input_ids"


def _refresh_values(gm: fx.GraphModule) -> None:
    """Recompute every fake value (the analysis reads them; later passes and the KV layout read the new ones)."""
    mode = detect_fake_mode([n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"])
    for node in gm.graph.nodes:
        if node.op == "get_attr" and mode is not None:
            tensor = param(gm, node)
            if tensor is not None:
                node.meta["val"] = mode.from_tensor(tensor, static_shapes=True)
        elif is_op(node, "paged_attention") and mode is not None:
            q, _, v = (a.meta["val"] for a in node.args[:3])  # type: ignore[union-attr]
            with mode:
                node.meta["val"] = q.new_empty((q.shape[0], q.shape[1], v.shape[-1]))
        elif node.op == "call_function" and all("val" in a.meta for a in node.all_input_nodes):
            infer_val(node)
