"""Gated MLP activation fusion: `act(gate) * up` over the two halves of the fused gate/up projection becomes
`kiln::silu_mul` or `kiln::gelu_mul` (exact or tanh-approximate GELU). Runs after fuse_linears, which produces
the halves as slices of one [T, 2I] matmul; separate gate/up tensors are left to region fusion."""

from __future__ import annotations

import torch
from torch import fx
from torch.fx.node import Argument

import kiln.ops  # noqa: F401  (declares the kiln:: ops)

from .base import GraphPass, PassContext, is_op
from .fuse_common import call, last_dim, val
from .pattern import Bind, Match, Op, Rule, apply_rules, op

_END = 2**63 - 1


def _half(node: Argument) -> tuple[fx.Node, int] | None:
    """(source, 0 or 1) when `node` is the first or second half of its source's last dim."""
    if not is_op(node, "slice") or len(node.args) < 4:
        return None
    src, dim, start, end = node.args[:4]
    value = val(src)
    if not isinstance(src, fx.Node) or not last_dim(src, dim) or value is None:
        return None
    width = value.shape[-1]
    if (start, end) == (0, width // 2):
        return src, 0
    if start == width // 2 and end in (width, _END):
        return src, 1
    return None


def _same_source(mul: fx.Node, m: Match) -> bool:
    gate, up = _half(m.bound["gate"]), _half(m.bound["up"])
    return gate is not None and up is not None and gate[0] is up[0] and (gate[1], up[1]) == (0, 1)


def gated_activation_pattern() -> Op:
    """`act(gate_up[..., :I]) * gate_up[..., I:]`, act silu or gelu, either operand order."""
    act = op(("silu", "gelu"), Bind("gate"), partial=True, name="act")
    return op("mul", act, Bind("up"), commutative=True, check=_same_source)


def _replace(gm: fx.GraphModule, m: Match) -> str:
    """`kiln::silu_mul(gate_up)` / `kiln::gelu_mul(gate_up, approximate)` in place of the product."""
    act, root = m.node("act"), m.root
    half = _half(m.bound["gate"])
    assert half is not None
    extra: tuple[Argument, ...] = ()
    if is_op(act, "silu"):
        key, target = "silu_mul", torch.ops.kiln.silu_mul.default
    else:  # gelu's `approximate` carries over
        approximate = act.kwargs.get("approximate", act.args[1] if len(act.args) > 1 else "none")
        key, target, extra = "gelu_mul", torch.ops.kiln.gelu_mul.default, (approximate,)
    with gm.graph.inserting_before(root):
        fused = call(gm.graph, target, (half[0], *extra), root)
    root.replace_all_uses_with(fused)
    m.erase(gm.graph)
    return key


RULES = (Rule(gated_activation_pattern(), _replace),)


class FuseActivation(GraphPass):
    name = "fuse_activation"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> dict[str, int]:
        return apply_rules(gm, RULES, {"silu_mul": 0, "gelu_mul": 0})
