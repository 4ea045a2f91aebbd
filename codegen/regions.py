"""Backend "triton": each region of passes/fuse_regions.py becomes one generated kernel, or goes back inline.

A region whose ops are all pointwise (casts included), optionally closed by one reduction over the last dim, with
one output, is written as one Triton expression over its inputs and launched as one `pointwise` kernel
(`kernels/pointwise_plan.region`: inputs broadcast by strides, math in float32, one rounding on store). A region
the expression cannot say (a view inside it, a boolean input, several outputs) is put back into the graph as its
ops, so that the graph's op counts are what launches.
"""

from __future__ import annotations

import json
import math
import operator
from typing import Any

import torch
from torch import fx

from kiln.passes.base import op_name

_BINARY = {"add": "+", "sub": "-", "mul": "*", "div": "/"}
_CALLS = {
    "exp": "tl.exp({})",
    "log": "tl.log({})",
    "sqrt": "tl.sqrt({})",
    "rsqrt": "tl.rsqrt({})",
    "reciprocal": "(1.0 / {})",
    "neg": "(-{})",
    "abs": "tl.abs({})",
    "sigmoid": "tl.sigmoid({})",
    "tanh": "tanh({})",
    "silu": "silu({})",
    "relu": "relu({})",
    "erf": "tl.erf({})",
}
_CASTS = {"to", "_to_copy", "type_as"}
_REDUCE = {"sum": "sum", "mean": "sum", "amax": "max"}


class _Unsayable(Exception):
    """The region holds something one pointwise expression cannot say."""


def _literal(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _Unsayable(f"argument {value!r}")
    return f"{float(value)!r}"


def _term(node: fx.Node, env: dict[fx.Node, str]) -> str:
    name = op_name(node).split(".")[-1]
    args = node.args

    def arg(i: int) -> str:
        a = args[i]
        return env[a] if isinstance(a, fx.Node) else _literal(a)

    if name in _BINARY and len(args) == 2 and not node.kwargs.get("rounding_mode"):
        alpha = node.kwargs.get("alpha")
        right = arg(1) if alpha is None else f"{_literal(alpha)} * {arg(1)}"
        return f"({arg(0)} {_BINARY[name]} {right})"
    if name in _CALLS and len(args) == 1:
        return _CALLS[name].format(arg(0))
    if name == "gelu" and len(args) == 1:
        return f"{'gelu_tanh' if node.kwargs.get('approximate') == 'tanh' else 'gelu'}({arg(0)})"
    if name == "pow" and isinstance(args[1], (int, float)) and float(args[1]).is_integer() and 1 <= args[1] <= 4:
        return "(" + " * ".join([arg(0)] * int(args[1])) + ")"
    if name in ("minimum", "maximum"):
        return f"tl.{name}({arg(0)}, {arg(1)})"
    if name in _CASTS:  # the chain computes in float32 and rounds once on store
        return arg(0)
    raise _Unsayable(op_name(node))


def region_spec(sub: fx.GraphModule, args: tuple) -> str:
    """The JSON spec `pointwise_plan.region` runs: the expression over x0..xN, its reduction, the output dtype.
    `args` are the region call's inputs (their fake values say what each placeholder receives)."""
    env: dict[fx.Node, str] = {}
    inputs = [n for n in sub.graph.nodes if n.op == "placeholder"]
    for i, (p, a) in enumerate(zip(inputs, args)):
        val = a.meta.get("val") if isinstance(a, fx.Node) else None
        if not isinstance(val, torch.Tensor) or not val.is_floating_point():
            raise _Unsayable(f"input {p.name}")
        env[p] = f"x{i}"
    (result,) = [n for n in sub.graph.nodes if n.op == "output"]
    out = result.args[0]
    if not isinstance(out, fx.Node):
        raise _Unsayable("several outputs")
    reduce, keepdim = "none", False
    for node in sub.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        name = op_name(node).split(".")[-1]
        if name in _REDUCE and node is out:
            source = node.args[0]
            assert isinstance(source, fx.Node)
            dims: Any = node.args[1]
            width = source.meta["val"].shape[-1]
            if list(dims) not in ([-1], [source.meta["val"].dim() - 1]) or isinstance(width, torch.SymInt):
                raise _Unsayable(f"{name} over {dims}")
            reduce, keepdim = _REDUCE[name], bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim"))
            env[node] = f"({env[source]} / {float(width)!r})" if name == "mean" else env[source]
        elif node.op == "call_function":
            env[node] = _term(node, env)
        else:
            raise _Unsayable(node.format_node())
    dtype = str(out.meta["val"].dtype).removeprefix("torch.")
    return json.dumps({"expr": env[out], "inputs": len(inputs), "reduce": reduce, "keepdim": keepdim, "dtype": dtype})


def _inline(gm: fx.GraphModule, node: fx.Node) -> None:
    """Put a region's ops back into the graph in place of its call."""
    sub = gm.get_submodule(str(node.target))
    assert isinstance(sub, fx.GraphModule)
    env: dict[fx.Node, Any] = dict(zip([n for n in sub.graph.nodes if n.op == "placeholder"], node.args))
    with gm.graph.inserting_before(node):
        for n in sub.graph.nodes:
            if n.op == "call_function":
                env[n] = gm.graph.node_copy(n, env.__getitem__)
    (result,) = [n for n in sub.graph.nodes if n.op == "output"]
    outs = result.args[0]
    if isinstance(outs, fx.Node):
        node.replace_all_uses_with(env[outs])
    else:
        for user in list(node.users):  # getitem(region, k)
            assert user.target is operator.getitem
            user.replace_all_uses_with(env[outs[user.args[1]]])
            gm.graph.erase_node(user)
    gm.graph.erase_node(node)
    delattr(gm, str(node.target))


def lower_regions(gm: fx.GraphModule, launcher: Any) -> tuple[int, int]:
    """Each region call becomes `launcher(spec, *inputs)` or its own ops again; returns (kernels, inlined)."""
    kernels = inlined = 0
    for node in [n for n in gm.graph.nodes if n.op == "call_module" and "kiln_region" in n.meta]:
        sub = gm.get_submodule(str(node.target))
        assert isinstance(sub, fx.GraphModule)
        try:
            spec = region_spec(sub, node.args)
        except _Unsayable:
            _inline(gm, node)
            inlined += 1
            continue
        with gm.graph.inserting_before(node):
            call = gm.graph.call_function(launcher, (spec, *node.args))
        call.meta.update(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        delattr(gm, str(node.target))
        kernels += 1
    return kernels, inlined
