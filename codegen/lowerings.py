"""Which launcher backend "triton" calls for each `kiln::` op, declared by the launchers themselves.

Each kernel's plan file (`kernels/<name>_plan.py`) holds its launcher: a function with the op's exact contract
that allocates the outputs, plans its kernels and runs them, marked `@lowers("kiln.<op>")`. `lowerings()`
imports every plan module in `kernels/` and returns the table, so adding a kernel edits no list here. Launchers
run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import TypeVar

from torch import Tensor

F = TypeVar("F", bound=Callable[..., object])
# kiln op name ("kiln.rms_norm") -> its launcher; ops without one keep their torch reference (layer_norm, ...).
LOWERINGS: dict[str, Callable[..., object]] = {}
KERNELS_PACKAGE = "kiln.codegen.kernels"


def lowers(*ops: str) -> Callable[[F], F]:
    """Declare the decorated launcher as backend "triton"'s implementation of the kiln ops named."""

    def register(fn: F) -> F:
        for op in ops:
            if op in LOWERINGS:
                raise ValueError(f"{op} has two launchers: {LOWERINGS[op].__name__} and {fn.__name__}")
            LOWERINGS[op] = fn
        return fn

    return register


def lowerings() -> dict[str, Callable[..., object]]:
    """Every launcher, after importing each plan module of `kernels/` (which registers its launchers)."""
    package = importlib.import_module(KERNELS_PACKAGE)
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.endswith("_plan"):
            importlib.import_module(f"{KERNELS_PACKAGE}.{info.name}")
    return LOWERINGS


def as_rows(x: Tensor) -> Tensor:
    """x as [rows, cols] with unit column stride, a view when possible."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def unit_last(x: Tensor) -> Tensor:
    """x with unit stride in its last dimension (a copy only when needed)."""
    return x if x.stride(-1) == 1 else x.contiguous()
