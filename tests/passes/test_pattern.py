"""passes/pattern.py: patterns match through casts, in either operand order, and only over nodes they own."""

from __future__ import annotations

import torch
from torch import fx
from torch.fx.experimental.proxy_tensor import make_fx

from kiln.passes.base import is_op
from kiln.passes.pattern import Bind, Casts, Match, OneOf, Rule, apply_rules, match_at, op, strip_casts


def _graph(fn, *shapes, dtype=torch.float32) -> fx.GraphModule:
    return make_fx(fn)(*(torch.randn(s, dtype=dtype) for s in shapes))


def _roots(gm: fx.GraphModule, pattern) -> list[Match]:
    return [m for n in gm.graph.nodes if (m := match_at(pattern, n)) is not None]


SCALED_EXP = op("mul", Casts(op("exp", Bind("x"))), Bind("s", where=lambda s: isinstance(s, float)), commutative=True)


def test_matches_through_casts_and_commuted_operands():
    gm = _graph(lambda x: 2.0 * x.exp().float(), (4,), dtype=torch.bfloat16)
    (m,) = _roots(gm, SCALED_EXP)
    assert m.bound["s"] == 2.0 and m.node("x").op == "placeholder"
    assert is_op(m.nodes[0], "exp") and m.nodes[-1] is m.root  # its own nodes, producers first


def test_a_node_read_outside_the_pattern_is_not_taken():
    gm = _graph(lambda x: (x.exp() * 2.0, x.exp().exp()), (4,))
    assert len(_roots(gm, SCALED_EXP)) == 1  # make_fx computes x.exp() twice: one exp is the pattern's own

    def both_read_exp(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = x.exp()
        return e * 2.0, e + 1

    shared = _graph(both_read_exp, (4,))
    assert _roots(shared, SCALED_EXP) == []


def test_bind_twice_means_the_same_value_and_alternatives_restore_bindings():
    square = op("mul", Bind("x"), Bind("x"))
    assert len(_roots(_graph(lambda x: x * x, (4,)), square)) == 1
    assert _roots(_graph(lambda x, y: x * y, (4,), (4,)), square) == []
    either = OneOf((op("neg", Bind("x"), name="negated"), Bind("x")))
    (m,) = _roots(_graph(lambda x: x.exp() * 3.0, (4,)), op("mul", either, Bind("s")))
    assert "negated" not in m.bound and is_op(m.bound["x"], "exp")


def test_apply_rules_rewrites_and_erases_what_the_pattern_owned():
    gm = _graph(lambda x: x.exp() * 2.0 + 1.0, (4,))

    def replace(gm: fx.GraphModule, m: Match) -> str:
        with gm.graph.inserting_before(m.root):
            new = gm.graph.call_function(torch.ops.aten.exp2.default, (m.node("x"),))
        m.root.replace_all_uses_with(new)
        m.erase(gm.graph)
        return "exp2"

    counts = apply_rules(gm, [Rule(SCALED_EXP, replace)], {"exp2": 0})
    assert counts == {"exp2": 1}
    assert not any(is_op(n, "exp", "mul") for n in gm.graph.nodes)


def test_strip_casts_is_the_one_way_through_casts():
    gm = _graph(lambda x: x.float().to(torch.bfloat16).exp(), (4,), dtype=torch.bfloat16)
    exp = next(n for n in gm.graph.nodes if is_op(n, "exp"))
    assert strip_casts(exp.args[0]).op == "placeholder"
