"""The op vocabulary's one registry: every `kiln::` op has a pure-torch reference in ops/, and backend
"reference" calls, for each op, either that reference or the CPU backend's function for it."""

from __future__ import annotations

import torch
from torch._library.custom_ops import OPDEFS

from kiln.backends.cpu import lowering
from kiln.ops.registry import references


def test_every_kiln_op_is_registered_with_its_reference_in_ops() -> None:
    refs = references()
    assert {op._schema.name for op in refs} == {name for name in OPDEFS if name.startswith("kiln::")}
    assert all(fn.__module__.startswith("kiln.ops.") for fn in refs.values())


def test_backend_reference_calls_the_reference_or_a_cpu_function_of_the_same_signature() -> None:
    refs, calls = references(), lowering.reference_calls()
    assert calls[torch.ops.aten.linear.default].__module__ == "kiln.backends.cpu.kernels"
    for op, ref in refs.items():
        chosen = calls[op]
        if chosen is not ref:
            assert chosen.__module__ == "kiln.backends.cpu.lowering" and chosen.__name__ == ref.__name__
            assert (
                chosen.__code__.co_varnames[: chosen.__code__.co_argcount]
                == ref.__code__.co_varnames[: ref.__code__.co_argcount]
            )
