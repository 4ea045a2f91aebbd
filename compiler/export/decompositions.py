"""Rewrite a compiled graph so that it holds only core aten ops and mutates nothing.

Exporters outside PyTorch (torch-mlir, and through it IREE and the like) know nothing of `kiln::` ops and
want pure functions. So `kiln::paged_attention`, which writes the step's K/V into caches it was handed, becomes
a functional scatter + gather + masked attention that returns the updated caches; the graph then returns
`(logits, k_cache_0', v_cache_0', ...)`. Every other `kiln::` op is pure and is replaced by its own torch
reference implementation, which is its aten formula (norms, rope, gated activations, and whatever ops are added
later, as long as their reference is traceable).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor
from torch._library.custom_ops import OPDEFS

from kiln.backends.cpu.lowering import reference_calls
from kiln.ops.metadata import AttentionMetadata

PAGED_ATTENTION = torch.ops.kiln.paged_attention.default


def paged_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slot_mapping: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    query_start_loc: Tensor,
    scale: float,
    window: int,
    softcap: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """`kiln::paged_attention` without mutation or data-dependent shapes; returns (out, k_cache', v_cache').

    Each token gathers its own sequence's whole block table (every block, not just the used ones: the width of
    block_tables is an input dimension, so no shape depends on values) and masks by absolute position.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_blocks, block_size, kv_heads, _ = k_cache.shape
    v_dim = v_cache.shape[-1]
    k_flat = k_cache.reshape(num_blocks * block_size, kv_heads, head_dim)
    v_flat = v_cache.reshape(num_blocks * block_size, kv_heads, v_dim)
    k_flat = torch.index_put(k_flat, (slot_mapping,), k.to(k_cache.dtype))
    v_flat = torch.index_put(v_flat, (slot_mapping,), v.to(v_cache.dtype))

    token = torch.arange(num_tokens, device=q.device)
    starts, ends = query_start_loc[:-1].long(), query_start_loc[1:].long()
    seq_id = (token[:, None] >= ends[None, :]).sum(-1)  # [T]: sequences that end at or before the token
    context_lens = seq_lens.long() - (ends - starts)
    q_pos = context_lens[seq_id] + token - starts[seq_id]  # absolute position of each token

    # Rows of block_tables picked out of its flattened form: a gather of whole rows of a dynamic width has no
    # static slice size, which StableHLO's gather needs.
    width = block_tables.shape[1]
    slots = block_tables.long().flatten()[seq_id[:, None] * width + torch.arange(width, device=q.device)]
    slots = (slots[:, :, None] * block_size + torch.arange(block_size, device=q.device)).flatten(1)  # [T, C]
    k_pos = torch.arange(slots.shape[1], device=q.device)
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window > 0:
        allowed = allowed & ((q_pos[:, None] - k_pos[None, :]) < window)

    group = num_heads // kv_heads
    keys = k_flat[slots].to(q.dtype).permute(0, 2, 3, 1)  # [T, Hkv, D, C]
    values = v_flat[slots].to(q.dtype).permute(0, 2, 1, 3)  # [T, Hkv, C, Dv]
    scores = torch.matmul(q.reshape(num_tokens, kv_heads, group, head_dim), keys).float() * scale
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~allowed[:, None, None, :], float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1).to(q.dtype), values)  # [T, Hkv, G, Dv]
    return (out.reshape(num_tokens, num_heads, v_dim), k_flat.reshape(k_cache.shape), v_flat.reshape(v_cache.shape))


def _reference(op: torch._ops.OpOverload) -> Callable[..., Any]:
    """The torch body a pure `kiln::` op was defined with: tracing it yields the op's aten formula."""
    name = op._schema.name
    if any(a.alias_info is not None and a.alias_info.is_write for a in op._schema.arguments):
        raise NotImplementedError(f"{name} mutates its inputs and has no functional decomposition")
    if name not in OPDEFS:
        raise NotImplementedError(f"{name} is not a torch.library.custom_op; no reference to decompose into")
    return OPDEFS[name]._init_fn


# input_ids and positions, then the metadata tensors; the caches follow.
NUM_STEP_INPUTS = 2 + len(AttentionMetadata.input_names())


def is_kiln_op(target: object) -> bool:
    """Whether an FX node target is one of kiln's custom ops (any overload in the `kiln` namespace)."""
    return isinstance(target, torch._ops.OpOverload) and target.namespace == "kiln"


def decompose(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over the same weights: no `kiln::` ops, caches returned instead of written.

    The placeholders after the step inputs are the caches; the new graph returns the logits
    followed by each cache's final value, in placeholder order. `gm` itself is left untouched.
    """
    graph = fx.Graph()
    remap: dict[fx.Node, fx.Node] = {}
    output = graph.graph_copy(gm.graph, remap)
    caches = [n for n in graph.nodes if n.op == "placeholder"][NUM_STEP_INPUTS:]
    declared = {fn: op for op, fn in reference_calls().items()}  # undo backend "reference"'s direct calls
    for node in graph.nodes:
        if node.op == "call_function" and node.target in declared:
            node.target = declared[node.target]
    latest = {c: c for c in caches}  # each cache's value after the writes so far (a layer could share one)
    for node in list(graph.nodes):
        if node.op != "call_function" or not is_kiln_op(node.target):
            continue
        if node.target != PAGED_ATTENTION:
            node.target = _reference(node.target)
            continue
        k_cache, v_cache = node.args[3], node.args[4]
        node.args = tuple(latest.get(a, a) if isinstance(a, fx.Node) else a for a in node.args)
        node.target = paged_attention
        with graph.inserting_after(node):
            new_v = graph.call_function(operator.getitem, (node, 2))
            new_k = graph.call_function(operator.getitem, (node, 1))
            out = graph.call_function(operator.getitem, (node, 0))
        added = (out, new_k, new_v)
        node.replace_all_uses_with(out, delete_user_cb=lambda user, added=added: user not in added)
        latest[k_cache], latest[v_cache] = new_k, new_v
    graph.output((output, *(latest[c] for c in caches)))
    graph.lint()
    new = fx.GraphModule(gm, graph, class_name="KilnFunctionalForward")
    new.graph._codegen = fx.graph.CodeGen()
    new.recompile()
    return new
