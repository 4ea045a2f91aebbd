"""A small pattern matcher for the fusion passes: a fusion states the computation it replaces as a tree of `Op`s
over `Bind`s (the pattern function) and a replacement function that receives what the tree bound.

Why not torch.fx's subgraph rewriter: the captured graphs carry literals that vary by model (eps), optional dtype
casts (present in half-precision graphs, gone in float32 ones) and commuted operands, and a fused norm replaces two
values (the normed output and the residual sum). Here a pattern is matched backwards from a root node:

- `Op(names, *args)` matches a call to one of the aten ops named whose arguments match `args` (patterns or
  literals compared with ==); `commutative` also tries its two arguments swapped. Nodes an Op matches belong to
  the pattern: each must have no user outside it (one user, the root excepted), and `Match.erase` removes them.
- `Bind(name)` matches anything (a node or a literal) and binds it; a second Bind of the same name must see the
  same value. What a Bind's `inner` pattern matches is an input of the pattern, not part of it.
- `Casts(p)` sees through any chain of dtype casts above what `p` matches (the one shared way to do so; passes
  that walk graphs by hand use `strip_casts`). At the root it takes the whole chain.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import fx
from torch.fx.node import Argument

from .base import is_op

CASTS = ("to", "_to_copy", "type_as")


def strip_casts(node: Argument, also: Sequence[str] = ()) -> Argument:
    """The value under any chain of dtype casts (they vanish in float32 graphs, stay in bf16 ones), and under the
    other pass-through ops named in `also` (e.g. eval-mode dropout)."""
    while is_op(node, *CASTS, *also):
        node = node.args[0]
    return node


@dataclass
class Match:
    """What one pattern matched at `root`: the values its Binds bound (and Ops named), and its own nodes."""

    root: fx.Node
    bound: dict[str, Argument] = field(default_factory=dict)
    nodes: list[fx.Node] = field(default_factory=list)  # post-order: producers before their users

    def node(self, name: str) -> fx.Node:
        found = self.bound[name]
        assert isinstance(found, fx.Node), f"{name} bound {found!r}, not a node"
        return found

    def save(self) -> tuple[dict[str, Argument], int]:
        return dict(self.bound), len(self.nodes)

    def restore(self, saved: tuple[dict[str, Argument], int]) -> None:
        self.bound = dict(saved[0])
        del self.nodes[saved[1] :]

    def erase(self, graph: fx.Graph) -> None:
        """Erase the pattern's nodes that nothing reads any more (after the replacement took over their users)."""
        for node in reversed(self.nodes):
            if not node.users:
                graph.erase_node(node)


class Pattern(abc.ABC):
    @abc.abstractmethod
    def match(self, arg: Argument, m: Match, owned: bool) -> bool:
        """Whether `arg` matches; binds into `m` (the caller restores `m` on failure). `owned`: `arg` would be
        part of the pattern (not one of its inputs)."""


def _match(p: object, arg: Argument, m: Match, owned: bool) -> bool:
    if isinstance(p, Pattern):
        return p.match(arg, m, owned)
    return not isinstance(arg, fx.Node) and arg == p


def _own(node: fx.Node, m: Match) -> bool:
    """A pattern node other than the root may be read only inside the pattern (through its single user)."""
    return node is m.root or len(node.users) == 1


@dataclass(frozen=True)
class Bind(Pattern):
    name: str
    inner: Pattern | None = None
    where: Callable[[Argument], bool] | None = None

    def match(self, arg: Argument, m: Match, owned: bool) -> bool:
        if self.name in m.bound:
            prev = m.bound[self.name]
            return prev is arg or (not isinstance(arg, fx.Node) and prev == arg)
        if self.where is not None and not self.where(arg):
            return False
        if self.inner is not None and not self.inner.match(arg, m, False):
            return False
        m.bound[self.name] = arg
        return True


@dataclass(frozen=True)
class Op(Pattern):
    names: tuple[str, ...]
    args: tuple[object, ...]
    commutative: bool = False  # also try the first two arguments swapped
    partial: bool = False  # the call may have more arguments than `args` (not checked)
    name: str | None = None  # bind the matched node under this name
    check: Callable[[fx.Node, Match], bool] | None = None  # run once the arguments matched

    def match(self, arg: Argument, m: Match, owned: bool) -> bool:
        if not is_op(arg, *self.names) or (owned and not _own(arg, m)):
            return False
        count = len(arg.args)
        if count < len(self.args) or (count > len(self.args) and not self.partial):
            return False
        orders = [self.args]
        if self.commutative:
            orders.append((self.args[1], self.args[0], *self.args[2:]))
        for order in orders:
            saved = m.save()
            if all(_match(p, a, m, owned) for p, a in zip(order, arg.args)):
                if self.name is not None:
                    m.bound[self.name] = arg
                if self.check is None or self.check(arg, m):
                    if owned:
                        m.nodes.append(arg)
                    return True
            m.restore(saved)
        return False


def op(
    names: str | tuple[str, ...],
    *args: object,
    commutative: bool = False,
    partial: bool = False,
    name: str | None = None,
    check: Callable[[fx.Node, Match], bool] | None = None,
) -> Op:
    """`Op` with its arguments written as a call: `op("add", Bind("x"), Bind("eps"))`."""
    return Op((names,) if isinstance(names, str) else names, args, commutative, partial, name, check)


@dataclass(frozen=True)
class Casts(Pattern):
    inner: Pattern

    def match(self, arg: Argument, m: Match, owned: bool) -> bool:
        if owned and arg is m.root and len(arg.users) == 1 and is_op(next(iter(arg.users)), *CASTS):
            return False  # the chain goes on: its last cast is the root
        chain = []
        while is_op(arg, *CASTS):
            if owned and not _own(arg, m):
                return False
            chain.append(arg)
            arg = arg.args[0]
        if not self.inner.match(arg, m, owned):
            return False
        if owned:
            m.nodes.extend(reversed(chain))
        return True


@dataclass(frozen=True)
class OneOf(Pattern):
    """The first alternative that matches."""

    alternatives: tuple[Pattern, ...]

    def match(self, arg: Argument, m: Match, owned: bool) -> bool:
        for alternative in self.alternatives:
            saved = m.save()
            if alternative.match(arg, m, owned):
                return True
            m.restore(saved)
        return False


@dataclass(frozen=True)
class Rule:
    """A fusion: its pattern and its replacement, which rewrites the graph and returns the counter to bump (None:
    declined, graph untouched)."""

    pattern: Pattern
    replace: Callable[[fx.GraphModule, Match], str | None]


def match_at(pattern: Pattern, root: fx.Node) -> Match | None:
    m = Match(root)
    return m if pattern.match(root, m, True) else None


def apply_rules(gm: fx.GraphModule, rules: Sequence[Rule], counts: dict[str, int]) -> dict[str, int]:
    """Try every rule at every node in graph order (a pattern only removes nodes before its root, which the walk
    has passed); the first rule that matches and is not declined rewrites there."""
    for node in list(gm.graph.nodes):
        for rule in rules:
            m = match_at(rule.pattern, node)
            key = rule.replace(gm, m) if m is not None else None
            if key is not None:
                counts[key] += 1
                break
    return counts
