"""Each kernel's arguments, declared once, by its plan.

The template renders its `@triton.jit` signature from the declaration (`{{ kernel_signature("kernel") }}`),
and a launch passes its arguments by name: `bind` checks the names against the same declaration and puts them
in its order. So a template and its plan cannot disagree on which argument sits where; a flag that enables
arguments (residual, bias, zero points, ...) is written on those arguments, not as `{% if %}` blocks in the
template and `if` branches in the plan.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

import torch

Kind = Literal["pointer", "scalar", "constexpr"]
When = str | tuple[str, Any] | None  # a flag that must be truthy, or (flag, value) it must equal
LINE = 116  # rendered signature lines stay within the 120-column limit


@dataclass(frozen=True)
class Arg:
    """One argument: its name, kind, and `when` the flags enable it (always, when None)."""

    name: str
    kind: Kind
    when: When = None

    def enabled(self, flags: dict[str, Any]) -> bool:
        if self.when is None:
            return True
        if isinstance(self.when, str):
            return bool(flags[self.when])
        flag, value = self.when
        return bool(flags[flag] == value)


def ptr(name: str, when: When = None) -> Arg:
    """A tensor argument (a pointer in the kernel)."""
    return Arg(name, "pointer", when)


def scalar(name: str, when: When = None) -> Arg:
    """A runtime int or float."""
    return Arg(name, "scalar", when)


def const(name: str, when: When = None) -> Arg:
    """A `tl.constexpr`: compiled into the kernel (tile sizes, head counts)."""
    return Arg(name, "constexpr", when)


@dataclass(frozen=True)
class Repeat:
    """Arguments repeated for each name in the list flag `over`, `{}` in their names standing for it (the
    pointwise chain's per-input pointer and stride)."""

    over: str
    args: tuple[Arg, ...]


_DECLARED: dict[str, dict[str, Kernel]] = {}


@dataclass(frozen=True)
class Kernel:
    """One `@triton.jit` function `name` of template `<template>.py.jinja`, with its arguments in order.

    Declaring one registers it: the template's `kernel_signature(name)` hook renders from it."""

    template: str
    name: str
    args: tuple[Arg | Repeat, ...]

    def __post_init__(self) -> None:
        kernels = _DECLARED.setdefault(self.template, {})
        if self.name in kernels and kernels[self.name] != self:
            raise ValueError(f"kernel {self.template}.{self.name} is declared twice, differently")
        kernels[self.name] = self

    def arguments(self, flags: dict[str, Any]) -> tuple[Arg, ...]:
        """The arguments these flags enable, in the kernel's order."""
        return _arguments(self, freeze(flags))

    def header(self, flags: dict[str, Any]) -> str:
        """`def name(...):` with the enabled arguments, runtime ones first, then the constexprs."""
        args = self.arguments(flags)
        runtime = [a.name for a in args if a.kind != "constexpr"]
        constexprs = [f"{a.name}: tl.constexpr" for a in args if a.kind == "constexpr"]
        lines = [line for group in (runtime, constexprs) for line in _wrap(group)]
        return f"def {self.name}(\n" + "".join(f"    {line}\n" for line in lines) + "):"

    def bind(self, flags: dict[str, Any], given: dict[str, Any]) -> tuple[list[tuple[str, Any]], dict[str, Any]]:
        """(runtime arguments in the kernel's order, constexprs) from arguments given by name; ValueError naming
        the kernel and the argument for a missing or unexpected name, TypeError for a value of the wrong kind."""
        args = self.arguments(flags)
        names = {a.name for a in args}
        label = f"kernel {self.template}.{self.name}"
        missing = [a.name for a in args if a.name not in given]
        if missing:
            raise ValueError(f"{label}: missing argument(s) {', '.join(missing)}")
        unexpected = [name for name in given if name not in names]
        if unexpected:
            raise ValueError(f"{label}: unexpected argument(s) {', '.join(unexpected)} for flags {flags}")
        runtime, constexprs = [], {}
        for a in args:
            value = given[a.name]
            if (a.kind == "pointer") != isinstance(value, torch.Tensor):
                raise TypeError(f"{label}: argument {a.name} is a {a.kind}, given a {type(value).__name__}")
            if a.kind == "constexpr":
                constexprs[a.name] = value
            else:
                runtime.append((a.name, value))
        return runtime, constexprs


@cache
def _arguments(kernel: Kernel, frozen: tuple) -> tuple[Arg, ...]:
    flags = thaw(frozen)
    out: list[Arg] = []
    for entry in kernel.args:
        if isinstance(entry, Repeat):
            out += [Arg(a.name.format(item), a.kind) for item in flags[entry.over] for a in entry.args
                    if a.enabled(flags)]
        elif entry.enabled(flags):
            out.append(entry)
    names = [a.name for a in out]
    if len(set(names)) != len(names):
        raise ValueError(f"kernel {kernel.template}.{kernel.name}: an argument name repeats in {names}")
    return tuple(out)


def _wrap(names: list[str]) -> list[str]:
    """Comma-separated names in lines of at most LINE columns (indent included), each ending with a comma."""
    lines: list[str] = []
    for name in names:
        if lines and 4 + len(lines[-1]) + len(name) + 2 <= LINE:
            lines[-1] += f" {name},"
        else:
            lines.append(f"{name},")
    return lines


def declared(template: str) -> dict[str, Kernel]:
    """The kernels declared for a template, by function name."""
    return _DECLARED.get(template, {})


def freeze(flags: dict[str, Any]) -> tuple:
    """Flags as a hashable key (list values become tuples)."""
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in flags.items()))


def thaw(frozen: tuple) -> dict[str, Any]:
    """The flags `freeze` made a key of."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in frozen}
