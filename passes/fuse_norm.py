"""Norm fusion: RMSNorm (Llama and Gemma forms) and LayerNorm, with the residual add before them, become
`kiln::rms_norm` / `kiln::add_rms_norm` / `kiln::layer_norm` / `kiln::add_layer_norm`.

RMSNorm is matched as HF writes it: `w * (x * rsqrt(mean(x², -1) + eps))` (or `(1 + w)` for Gemma), through the
float32 casts it carries in half-precision graphs. A residual add `a + b` feeding the norm is folded in; its
sum stays available as the op's second output, the residual stream of the next layer.

Each norm is a pattern function (passes/pattern.py) and a replacement function; the replacement inserts the op
right after the norm's input, so a residual add that feeds it can be folded in.
"""

from __future__ import annotations

import operator

import torch
from torch import fx
from torch._ops import OpOverload

from kiln import ops  # noqa: F401  (declares the kiln:: ops)

from .base import GraphPass, PassContext, is_op
from .fuse_common import call, param, val
from .pattern import Bind, Casts, Match, OneOf, Op, Rule, apply_rules, op

kiln = torch.ops.kiln


def _last_dim_mean(mean: fx.Node, m: Match) -> bool:
    """The mean runs over the last dim only (the kernel normalises rows)."""
    dims, v = mean.args[1], val(mean)
    return isinstance(dims, (list, tuple)) and v is not None and list(dims) in ([-1], [v.dim() - 1])


def _rms_fits(scale: fx.Node, m: Match) -> bool:
    """A 1-D weight parameter, and the norm's output (after its casts) in the dtype of its input."""
    gm = m.root.graph.owning_module
    assert gm is not None
    w, x, out = param(gm, m.bound["weight"]), val(m.bound["x"]), val(m.root)
    return w is not None and w.dim() == 1 and x is not None and out is not None and out.dtype == x.dtype


def rms_norm_pattern() -> Casts:
    """`cast(w * cast(xf * rsqrt(mean(xf ** 2, -1) + eps)))` with xf = cast(x), w a weight or Gemma's (1 + w)."""
    xf = Bind("xf", Casts(Bind("x")))
    variance = op("mean", op("pow", xf, 2), partial=True, check=_last_dim_mean)
    rsqrt = op("rsqrt", op("add", variance, Bind("eps", where=lambda e: isinstance(e, float))))
    weight = OneOf((op("add", Bind("weight_cast", Casts(Bind("weight"))), 1.0, name="offset"), Bind("weight")))
    scale = op("mul", Casts(op("mul", xf, rsqrt, commutative=True)), weight, commutative=True, check=_rms_fits)
    return Casts(scale)


def _replace_rms(gm: fx.GraphModule, m: Match) -> str:
    """`kiln::(add_)rms_norm(x, weight, eps, offset)` in place of the matched norm; offset 1 for Gemma's (1 + w)."""
    offset = 1.0 if "offset" in m.bound else 0.0
    eps = m.bound["eps"]
    assert isinstance(eps, float)
    tail = (m.bound["weight"], eps, offset)
    key = _replace(gm, m.node("x"), m.root, kiln.rms_norm.default, kiln.add_rms_norm.default, tail)
    m.erase(gm.graph)
    return key


def layer_norm_pattern() -> Op:
    """`layer_norm(x, [hidden], weight?, bias?, eps?)` over the last dim only."""
    shape = Bind("shape", where=lambda s: isinstance(s, (list, tuple)) and len(s) == 1)
    return op("layer_norm", Bind("x"), shape, partial=True)


def _replace_layer_norm(gm: fx.GraphModule, m: Match) -> str:
    """`kiln::(add_)layer_norm(x, weight, bias, eps)`, with aten's defaults for what the call leaves out."""
    node = m.root
    _, _, weight, bias, eps = (list(node.args) + [None, None, 1e-5])[:5]
    key = _replace(gm, m.node("x"), node, kiln.layer_norm.default, kiln.add_layer_norm.default, (weight, bias, eps))
    m.erase(gm.graph)
    return key


def _residual(x: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(a, b) when x = a + b elementwise, same shape and dtype (no broadcasting, no alpha)."""
    if not (is_op(x, "add") and not x.kwargs and len(x.args) == 2):
        return None
    a, b, out = x.args[0], x.args[1], val(x)
    values = [val(n) for n in (a, b)]
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node) and out is not None):
        return None
    same = [v is not None and v.shape == out.shape and v.dtype == out.dtype for v in values]
    return (a, b) if all(same) else None


def _replace(gm: fx.GraphModule, x: fx.Node, out: fx.Node, plain: OpOverload, fused: OpOverload, tail: tuple) -> str:
    """Insert the (add_)norm right after x, rewire its users; return the counter name."""
    graph, res = gm.graph, _residual(x)
    with graph.inserting_after(x):
        if res is None:
            node = call(graph, plain, (x, *tail), out)
            out.replace_all_uses_with(node)
            return plain.name().split("::")[-1]
        both = call(graph, fused, (*res, *tail), out)
    with graph.inserting_after(both):
        normed = call(graph, operator.getitem, (both, 0), out)
        summed = call(graph, operator.getitem, (both, 1), x)
    out.replace_all_uses_with(normed)
    x.replace_all_uses_with(summed)
    return fused.name().split("::")[-1]


RULES = (Rule(rms_norm_pattern(), _replace_rms), Rule(layer_norm_pattern(), _replace_layer_norm))


class FuseNorm(GraphPass):
    name = "fuse_norm"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> dict[str, int]:
        counts = {"rms_norm": 0, "add_rms_norm": 0, "layer_norm": 0, "add_layer_norm": 0}
        return apply_rules(gm, RULES, counts)
