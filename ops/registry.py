"""The one registry of kiln's op vocabulary: every `kiln::` op and the pure-torch function it was declared from."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch._library.custom_ops import OPDEFS

from . import attention, fused, quant  # noqa: F401  (declares every kiln:: op)


def references() -> dict[Any, Callable[..., Any]]:
    """{`torch.ops.kiln.X.default`: the function op X was declared from}: its pure-torch reference, called
    directly by backend "reference" (the same code without the dispatcher's round trip, about 10 us a call, as
    much as a fused op's whole work at decode sizes) wherever no backend kernel replaces it."""
    found: dict[Any, Callable[..., Any]] = {}
    for name, opdef in OPDEFS.items():
        fn: Callable[..., Any] | None = opdef._init_fn
        if fn is None or not name.startswith("kiln::"):
            continue
        if _importable(fn):
            found[getattr(torch.ops.kiln, name.removeprefix("kiln::")).default] = fn
    return found


def _importable(fn: Callable[..., Any]) -> bool:
    """Whether `fn` is a module-level function, which generated code (an artifact's forward.py) can import."""
    return getattr(importlib.import_module(fn.__module__), fn.__qualname__, None) is fn
