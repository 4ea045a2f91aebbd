"""The only callables an artifact's graph may name, and the names they are saved under.

Loading resolves every `call_function` target through `resolve` alone: never `import` of a module the
artifact names, never `getattr` on an arbitrary object. What kiln's own graphs call (found by compiling every
tiny family with both backends and each quantization mode) is: aten/prims/kiln op overloads, a few `operator`
functions, the launchers of backend "triton" (`kiln.codegen.lowerings.lowerings()`) and the functions backend
"reference" calls in place of ops (`kiln.backends.cpu.lowering.reference_calls`). Anything else is refused.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from typing import Any

import torch

OP_NAMESPACES = ("aten", "prims", "kiln")
OP_PREFIX = "torch.ops."
# operator functions an FX graph may hold: indexing a multi-output node, symbolic shape arithmetic.
OPERATORS = ("getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "neg", "eq", "ne", "lt", "le", "gt", "ge")
_IDENT = re.compile(r"(?!__)[A-Za-z_][A-Za-z0-9_]*\Z")  # no dunders


class TargetError(ValueError):
    """A graph target outside the allowlist."""


def _registered(module: str) -> list[Callable[..., Any]]:
    """The kiln functions the lowerings can put into a graph, from the registry that owns `module` (imported
    only when a graph names it: a reference artifact never imports the Triton launchers)."""
    if module.startswith("kiln.codegen.kernels."):
        from kiln.codegen.lowerings import lowerings

        return list(lowerings().values())
    if module.startswith(("kiln.backends.cpu.", "kiln.ops.")):
        from kiln.backends.cpu.lowering import reference_calls

        return [fn for fn in reference_calls().values() if not isinstance(fn, torch._ops.OpOverload)]
    return []


def _function_name(fn: Callable[..., Any]) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


def target_name(target: object) -> str:
    """The saved name of an allowed target; TargetError for anything loading would refuse."""
    if isinstance(target, torch._ops.OpOverload):
        if target.namespace not in OP_NAMESPACES:
            allowed = ", ".join(OP_NAMESPACES)
            raise TargetError(f"op {target} is outside the namespaces an artifact may call ({allowed})")
        return f"{OP_PREFIX}{target.namespace}.{target._opname}.{target._overloadname}"
    for name in OPERATORS:
        if target is getattr(operator, name):
            return f"operator.{name}"
    module = getattr(target, "__module__", None) or ""
    if callable(target) and any(fn is target for fn in _registered(module)):
        return _function_name(target)
    raise TargetError(f"{target!r} is not a target an artifact may call")


def resolve(name: str) -> Callable[..., Any]:
    """The callable an artifact names, or TargetError naming it."""
    if not isinstance(name, str):
        raise TargetError(f"target {name!r} is not a name")
    if name.startswith(OP_PREFIX):
        return _op(name)
    if name.startswith("operator."):
        short = name.removeprefix("operator.")
        if short in OPERATORS:
            return getattr(operator, short)
    else:
        module = name.rpartition(".")[0]
        for fn in _registered(module):
            if _function_name(fn) == name:
                return fn
    raise TargetError(f"target {name} is not allowed in an artifact's graph")


def _op(name: str) -> torch._ops.OpOverload:
    parts = name.removeprefix(OP_PREFIX).split(".")
    if len(parts) != 3 or parts[0] not in OP_NAMESPACES or not all(_IDENT.match(p) for p in parts[1:]):
        raise TargetError(f"target {name} is not allowed in an artifact's graph")
    namespace, op, overload = parts
    try:
        found = getattr(getattr(getattr(torch.ops, namespace), op), overload)
    except (AttributeError, RuntimeError) as err:
        raise TargetError(f"target {name}: no such op in this torch/kiln ({err})") from err
    if not isinstance(found, torch._ops.OpOverload):
        raise TargetError(f"target {name} is not an op overload")
    return found
