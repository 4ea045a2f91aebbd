"""Each kernel's arguments, declared once, by its plan.

The template renders its `@triton.jit` signature from the declaration (`{{ kernel_signature("kernel") }}`),
and a launch passes its arguments by name: `bind` checks the names against the same declaration and puts them
in its order. So a template and its plan cannot disagree on which argument sits where; a flag that enables
arguments (residual, bias, zero points, ...) is written on those arguments, not as `{% if %}` blocks in the
template and `if` branches in the plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

Kind = Literal["pointer", "index", "scalar", "size", "constexpr"]
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


def index(name: str, when: When = None) -> Arg:
    """A tensor of the step's own indices (positions, slots, sequence lengths, query starts, block tables): the
    model runner packs them at offsets that move with the batch, so the kernel is not specialised on its address's
    alignment (`do_not_specialize_on_alignment`) and one compiled kernel serves every batch."""
    return Arg(name, "index", when)


def scalar(name: str, when: When = None) -> Arg:
    """A runtime int or float."""
    return Arg(name, "scalar", when)


def size(name: str, when: When = None) -> Arg:
    """A runtime int that changes from step to step (a token count, a table's width). Triton would specialise
    on its value (equal to 1, divisible by 16) and compile a kernel per kind of value; a size is declared
    `do_not_specialize`, so one compiled kernel, and an ahead-of-time one (codegen/aot.py), serves every value."""
    return Arg(name, "size", when)


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
class _Layout:
    """A kernel's arguments under one set of flags, as `bind` uses them."""

    args: tuple[Arg, ...]
    names: frozenset[str]
    runtime: tuple[str, ...]
    constexprs: tuple[str, ...]
    pointers: tuple[str, ...]
    scalars: tuple[str, ...]
    sizes: tuple[str, ...]


@dataclass(frozen=True, eq=False)  # hashed by identity: a launch looks its layout up on every run
class Kernel:
    """One `@triton.jit` function `name` of template `<template>.py.jinja`, with its arguments in order.

    Declaring one registers it: the template's `kernel_signature(name)` hook renders from it."""

    template: str
    name: str
    args: tuple[Arg | Repeat, ...]
    _layouts: dict[tuple, _Layout] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        kernels = _DECLARED.setdefault(self.template, {})
        if self.name in kernels and kernels[self.name].args != self.args:
            raise ValueError(f"kernel {self.template}.{self.name} is declared twice, differently")
        kernels[self.name] = self

    def _layout(self, flags: dict[str, Any]) -> _Layout:
        try:  # the flags' items as they are (the common case, cheap); sorted, lists as tuples, when unhashable
            key = tuple(flags.items())
            layout = self._layouts.get(key)
        except TypeError:
            key = freeze(flags)
            layout = self._layouts.get(key)
        if layout is None:
            args = _enabled(self, flags)
            layout = self._layouts[key] = _Layout(
                args,
                frozenset(a.name for a in args),
                tuple(a.name for a in args if a.kind != "constexpr"),
                tuple(a.name for a in args if a.kind == "constexpr"),
                tuple(a.name for a in args if a.kind in ("pointer", "index")),
                tuple(a.name for a in args if a.kind == "scalar"),
                tuple(a.name for a in args if a.kind == "size"),
            )
        return layout

    def arguments(self, flags: dict[str, Any]) -> tuple[Arg, ...]:
        """The arguments these flags enable, in the kernel's order."""
        return self._layout(flags).args

    def header(self, flags: dict[str, Any]) -> str:
        """`@triton.jit(...)` and `def name(...):` with the enabled arguments, runtime ones first, then the
        constexprs; sizes and indices are named in the decorator as what Triton must not specialise on."""
        layout = self._layout(flags)
        indices = [a.name for a in layout.args if a.kind == "index"]
        chosen = (("do_not_specialize", list(layout.sizes)), ("do_not_specialize_on_alignment", indices))
        options = [f"{k}={v!r}" for k, v in chosen if v]
        decorator = f"@triton.jit({', '.join(options)})" if options else "@triton.jit"
        constexprs = [f"{name}: tl.constexpr" for name in layout.constexprs]
        lines = [line for group in (list(layout.runtime), constexprs) for line in _wrap(group)]
        return f"{decorator}\ndef {self.name}(\n" + "".join(f"    {line}\n" for line in lines) + "):"

    def bind(self, flags: dict[str, Any], given: dict[str, Any]) -> tuple[list[tuple[str, Any]], dict[str, Any]]:
        """(runtime arguments in the kernel's order, constexprs) from arguments given by name; ValueError naming
        the kernel and the argument for a missing or unexpected name, TypeError for a value of the wrong kind."""
        layout = self._layout(flags)
        if given.keys() != layout.names:
            label = f"kernel {self.template}.{self.name}"
            missing = [a.name for a in layout.args if a.name not in given]
            if missing:
                raise ValueError(f"{label}: missing argument(s) {', '.join(missing)}")
            unexpected = [name for name in given if name not in layout.names]
            raise ValueError(f"{label}: unexpected argument(s) {', '.join(unexpected)} for flags {flags}")
        runtime = [(name, given[name]) for name in layout.runtime]
        constexprs = {name: given[name] for name in layout.constexprs}
        # Plain-type checks first: isinstance against torch.Tensor is slow for values that are not tensors.
        if not (
            all(isinstance(given[name], torch.Tensor) for name in layout.pointers)
            and all(isinstance(given[name], (int, float)) for name in layout.scalars)
            and all(isinstance(given[name], int) for name in layout.sizes)
            and all(isinstance(value, (int, float, str)) for value in constexprs.values())
        ):
            wrong = next(a for a in layout.args if not _fits(a.kind, given[a.name]))
            raise TypeError(
                f"kernel {self.template}.{self.name}: argument {wrong.name} is a {wrong.kind}, given a "
                f"{type(given[wrong.name]).__name__}"
            )
        return runtime, constexprs


def _fits(kind: Kind, value: Any) -> bool:
    """Whether `value` can be passed as an argument of `kind`."""
    if kind in ("pointer", "index"):
        return isinstance(value, torch.Tensor)
    if kind == "size":
        return isinstance(value, int)
    return isinstance(value, (int, float) if kind == "scalar" else (int, float, str))


def _enabled(kernel: Kernel, flags: dict[str, Any]) -> tuple[Arg, ...]:
    """The arguments `flags` enable, Repeat groups expanded; an error if a name repeats."""
    out: list[Arg] = []
    for entry in kernel.args:
        if isinstance(entry, Repeat):
            out += [
                Arg(a.name.format(item), a.kind) for item in flags[entry.over] for a in entry.args if a.enabled(flags)
            ]
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
