"""Helpers the passes share: typed access to node arguments and fake values, giving new nodes the metadata of the
nodes they replace (layer attribution, fake values for later passes and codegen), reading and adding parameters."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import fx
from torch._dispatch.python import enable_python_dispatcher
from torch._guards import detect_fake_mode

aten = torch.ops.aten


def arg_node(node: fx.Node, index: int) -> fx.Node:
    """Argument `index` of a call that the pattern already tells is a node (an input tensor, a weight)."""
    arg = node.args[index]
    assert isinstance(arg, fx.Node), f"{node.format_node()}: argument {index} is {arg!r}, not a node"
    return arg


def val(node: object) -> torch.Tensor | None:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def last_dim(node: fx.Node, dim: object) -> bool:
    """Whether `dim` names the last dimension of `node`'s value."""
    v = val(node)
    return v is not None and isinstance(dim, int) and dim % v.dim() == v.dim() - 1


def single_user(node: object) -> bool:
    return isinstance(node, fx.Node) and len(node.users) == 1


def call(graph: fx.Graph, target: Callable[..., Any], args: tuple, like: fx.Node) -> fx.Node:
    """Insert a call (at the graph's insertion point) with `like`'s module stack and its fake value computed."""
    node = graph.call_function(target, args)
    for key in ("nn_module_stack", "stack_trace"):
        if key in like.meta:
            node.meta[key] = like.meta[key]
    infer_val(node)
    return node


def infer_val(node: fx.Node) -> None:
    """Fill node.meta["val"] by running the op on its inputs' fake values (what export would have recorded)."""
    vals = [n.meta.get("val") for n in node.all_input_nodes]
    mode = detect_fake_mode(vals)
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta.get("val"))
    assert callable(node.target) and isinstance(args, tuple) and isinstance(kwargs, dict)
    if mode is not None:  # the python dispatcher, as under export: composite ops (linear) decompose with
        with mode, enable_python_dispatcher():  # symbolic sizes (torch 2.11's C++ matmul calls numel())
            node.meta["val"] = node.target(*args, **kwargs)


def param(gm: fx.GraphModule, node: object) -> torch.Tensor | None:
    """The tensor a get_attr node reads, else None."""
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return None
    module_path, _, attr = str(node.target).rpartition(".")
    return getattr(gm.get_submodule(module_path) if module_path else gm, attr)


def new_attr(gm: fx.GraphModule, qualified: str, tensor: torch.Tensor, like: fx.Node, buffer: bool = False) -> fx.Node:
    """Register `tensor` at `qualified` (a parameter, or a buffer) and return a get_attr node reading it.

    `like` is any node of the graph whose inputs carry fake values: the new node's value joins their fake mode.
    """
    module_path, _, attr = qualified.rpartition(".")
    owner = gm.get_submodule(module_path) if module_path else gm
    if not buffer:
        owner.register_parameter(attr, torch.nn.Parameter(tensor, requires_grad=False))
    else:
        owner.register_buffer(attr, tensor)
    first = next(n for n in gm.graph.nodes if n.op not in ("placeholder",))
    with gm.graph.inserting_before(first):
        node = gm.graph.get_attr(qualified)
    mode = detect_fake_mode([n.meta.get("val") for n in like.all_input_nodes])
    # A weight's shape is fixed: without static_shapes torch 2.11 gives it fresh symbols.
    node.meta["val"] = mode.from_tensor(tensor, static_shapes=True) if mode is not None else tensor
    return node


def drop_attr(gm: fx.GraphModule, node: fx.Node) -> None:
    """Erase a get_attr node nothing reads any more, and its tensor unless another node reads that (a tied
    embedding)."""
    target = str(node.target)
    if node.users:
        return
    gm.graph.erase_node(node)
    if not any(n.op == "get_attr" and n.target == target for n in gm.graph.nodes):
        owner, _, attr = target.rpartition(".")
        delattr(gm.get_submodule(owner) if owner else gm, attr)
