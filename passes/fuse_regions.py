"""Region fusion: what the pattern fusions leave of pointwise work becomes one call per region.

A region is a connected group of pointwise ops (casts and views between them included), optionally closed by
one reduction over the last dim. Groups grow greedily in graph order on a networkx view of the graph: a node
joins a producer's group unless some path leaves that group and comes back to the node (merging would make a
cycle). Every member used outside its group is an output of the region, so nothing computed is lost.

On the reference backend a region is a `region_N` submodule (a GraphModule running the group's torch ops, so
`compiled.code` stays readable and the region's own code is `gm.region_N.code`). Its description — ops, inputs,
outputs — is in `node.meta["kiln_region"]` for codegen, which lowers each region to one kernel.
"""

from __future__ import annotations

import itertools
import operator

import networkx as nx
from torch import fx

from .base import GraphPass, PassContext, is_op, is_view, op_name
from .fuse_common import arg_node, last_dim

POINTWISE = {
    "add",
    "sub",
    "mul",
    "div",
    "neg",
    "pow",
    "exp",
    "log",
    "sqrt",
    "rsqrt",
    "reciprocal",
    "tanh",
    "sigmoid",
    "silu",
    "gelu",
    "relu",
    "erf",
    "abs",
    "clamp",
    "minimum",
    "maximum",
    "where",
    "to",
    "_to_copy",
    "type_as",
}
REDUCTIONS = {"mean", "sum", "amax"}


def _kind(node: fx.Node) -> str | None:
    if node.op != "call_function":
        return None
    dims = node.args[1] if len(node.args) > 1 else None
    if (
        is_op(node, *REDUCTIONS)
        and isinstance(dims, (list, tuple))
        and len(dims) == 1
        and last_dim(arg_node(node, 0), dims[0])
    ):
        return "reduction"
    if is_op(node, *POINTWISE):
        return "pointwise"
    if is_view(node) and node.target is not operator.getitem:
        return "view"
    return None


def _groups(graph: fx.Graph) -> list[list[fx.Node]]:
    """Greedy grouping in topological order; `reach[n]` is the set of groups among n's strict ancestors."""
    group_of: dict[fx.Node, int] = {}
    closed: set[int] = set()  # groups ended by a reduction
    members: list[list[fx.Node]] = []
    reach: dict[fx.Node, set[int]] = {}
    for node in graph.nodes:
        inputs = node.all_input_nodes
        reach[node] = set().union(*(reach[i] | ({group_of[i]} if i in group_of else set()) for i in inputs))
        kind = _kind(node)
        if kind is None:
            continue
        for g in dict.fromkeys(group_of[i] for i in inputs if i in group_of):
            # Joining g is safe when no input outside g has g among its ancestors.
            if g not in closed and not any(g in reach[i] for i in inputs if group_of.get(i) != g):
                group_of[node] = g
                members[g].append(node)
                closed |= {g} if kind == "reduction" else set()
                break
        else:
            if kind != "view":
                group_of[node] = len(members)
                members.append([node])
                closed |= {group_of[node]} if kind == "reduction" else set()
    return [_trim(m) for m in members]


def _trim(group: list[fx.Node]) -> list[fx.Node]:
    """Drop trailing views: a view read only outside its group is better left outside."""
    inside = set(group)
    while any(is_view(n) and not (set(n.users) & inside) for n in group):
        group = [n for n in group if not (is_view(n) and not (set(n.users) & inside))]
        inside = set(group)
    return group


def _check_acyclic(graph: fx.Graph, groups: list[list[fx.Node]]) -> None:
    """The graph with every region contracted to one node must stay a DAG (the grouping guarantees it)."""
    label = {n: ("region", i) for i, g in enumerate(groups) for n in g}
    view = nx.DiGraph()
    view.add_edges_from(
        (label.get(i, i), label.get(n, n))
        for n in graph.nodes
        for i in n.all_input_nodes
        if label.get(i, i) != label.get(n, n)
    )
    if not nx.is_directed_acyclic_graph(view):
        raise AssertionError("region fusion would create a cycle")


def _outline(gm: fx.GraphModule, group: list[fx.Node], name: str) -> fx.Node:
    """Move `group` into submodule `name` and call it in the parent graph; returns the call node."""
    inside = set(group)
    inputs = list(dict.fromkeys(i for n in group for i in n.all_input_nodes if i not in inside))
    outputs = [n for n in group if set(n.users) - inside]
    sub = fx.Graph()
    env = {i: sub.placeholder(i.name) for i in inputs}
    for n in group:
        env[n] = sub.node_copy(n, env.__getitem__)
    sub.output(env[outputs[0]] if len(outputs) == 1 else tuple(env[o] for o in outputs))
    gm.add_submodule(name, fx.GraphModule(gm, sub, class_name=name))
    with gm.graph.inserting_before(group[0]):
        region = gm.graph.call_module(name, tuple(inputs))
    region.meta.update({k: group[-1].meta[k] for k in ("nn_module_stack", "stack_trace") if k in group[-1].meta})
    region.meta["kiln_region"] = {
        "ops": [op_name(n) for n in group],
        "inputs": [i.name for i in inputs],
        "outputs": [o.name for o in outputs],
    }
    vals = [o.meta.get("val") for o in outputs]
    region.meta["val"] = vals[0] if len(outputs) == 1 else tuple(vals)
    with gm.graph.inserting_after(region):
        for k, out in enumerate(outputs):
            new = region if len(outputs) == 1 else gm.graph.call_function(operator.getitem, (region, k))
            new.meta.update(out.meta)
            out.replace_all_uses_with(new, delete_user_cb=lambda user: user not in inside)
    for n in reversed(group):
        gm.graph.erase_node(n)
    return region


def _restore_order(graph: fx.Graph) -> None:
    """Re-sort the nodes topologically, keeping the original order wherever the data allows."""
    index = {n: i for i, n in enumerate(graph.nodes)}
    deps = nx.DiGraph()
    deps.add_nodes_from(graph.nodes)
    deps.add_edges_from((i, n) for n in graph.nodes for i in n.all_input_nodes)
    order = list(nx.lexicographical_topological_sort(deps, key=index.__getitem__))
    for prev, node in itertools.pairwise(order):
        prev.append(node)


class FuseRegions(GraphPass):
    name = "fuse_regions"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> dict[str, int]:
        gm.graph.eliminate_dead_code()
        groups = [g for g in _groups(gm.graph) if sum(not is_view(n) for n in g) >= 2]
        _check_acyclic(gm.graph, groups)
        for i, group in enumerate(groups):
            _outline(gm, group, f"region_{i}")
        if groups:
            _restore_order(gm.graph)
        return {"regions": len(groups), "ops_fused": sum(len(g) for g in groups)}
