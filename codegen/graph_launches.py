"""The kernel launches a compiled model's own forward makes at each step, on a GPU it does not have.

The forward runs on fake tensors (no memory, no arithmetic) inside `kernel_plan.planning(target)`: every
launcher in the lowered graph, fused regions and quantized linears included, plans its launch from the graph's
real tensors (their views, strides and dtypes, the flags the graph gives) for the target's shared memory and SM
count, and hands it over instead of launching. So an artifact's cross-compile (cross_compile.py) compiles what
serving launches, not what a config suggests. Each step of `cross_compile.STEPS` runs once; each tensor of a
launch becomes a `meta` tensor with the same shape, strides and storage offset (its address's alignment is
what Triton specialises on).
"""

from __future__ import annotations

from typing import Any

import torch

from kiln.ops.metadata import AttentionMetadata, step_context

from .kernel_plan import Launch, Target, planning
from .model_step import Planned
from .render import not_interpreting


def _as_meta(t: torch.Tensor) -> torch.Tensor:
    """A `meta` tensor with t's dtype, shape, strides and storage offset."""
    span = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()) if size > 0)
    base = torch.empty(t.storage_offset() + span, dtype=t.dtype, device="meta")
    return base.as_strided(t.shape, t.stride(), t.storage_offset())


def _step_launches(compiled: Any, target: Target, seqs: int, query_len: int, block_size: int) -> list[Launch]:
    """The launches of one step of `seqs` sequences adding `query_len` tokens each (decode: after 15 cached)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    device = getattr(compiled, "device", None) or torch.device("cpu")  # small real inputs, beside the weights
    context = 15 if query_len == 1 else 0
    per_seq = -(-(context + query_len) // block_size)
    tables = [[s * per_seq + b for b in range(per_seq)] for s in range(seqs)]
    meta = AttentionMetadata.build([query_len] * seqs, [context] * seqs, tables, block_size, device)
    ids = torch.zeros(seqs * query_len, dtype=torch.int64, device=device)
    positions = torch.arange(context, context + query_len, device=device).repeat(seqs)
    with FakeTensorMode(allow_non_fake_inputs=True), planning(target) as launches, step_context(meta):
        caches = compiled.allocate_kv_cache(seqs * per_seq, block_size)
        compiled.graph_module(ids, positions, *meta.graph_inputs(), *caches)
    for launch in launches:
        launch.args = {k: _as_meta(v) if isinstance(v, torch.Tensor) else v for k, v in launch.args.items()}
    return launches


def graph_launches(
    compiled: Any, target: Target, steps: tuple[tuple[str, int, int], ...], block_size: int = 16
) -> list[Planned]:
    """Every launch of every step (name, sequences, query length each) of `compiled`'s forward on `target`,
    each named by its kernel: `template`, or `template_function` for a template's other kernels."""
    planned = []
    with not_interpreting(), torch.inference_mode():
        for step, seqs, query_len in steps:
            for launch in _step_launches(compiled, target, seqs, query_len, block_size):
                kernel = launch.kernel
                name = kernel.template if kernel.name == "kernel" else f"{kernel.template}_{kernel.name}"
                planned.append(Planned(name, step, launch))
    return planned
