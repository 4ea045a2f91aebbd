"""Capture an HF causal LM with `torch.export` over one packed stream of tokens.

The captured signature is `(input_ids [T], positions [T]) -> logits [T, vocab]` with T dynamic, so one graph
serves prefill chunks and decode tokens of many sequences at once. Nothing here is architecture specific.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from transformers import PreTrainedModel


class _PackedStream(torch.nn.Module):
    """Presents a packed token stream to the HF model as a batch of one."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids[None], position_ids=positions[None], use_cache=False)
        return out.logits[0]


def capture(model: PreTrainedModel, max_model_len: int) -> fx.GraphModule:
    """Export `model` and return a plain GraphModule taking (input_ids, positions) positionally."""
    example = torch.arange(8, device=model.device) % max(2, model.config.vocab_size)
    tokens = torch.export.Dim("tokens", min=2, max=max(3, max_model_len))
    with torch.no_grad():
        exported = torch.export.export(
            _PackedStream(model.eval()),
            (example, torch.arange(8, device=model.device)),
            dynamic_shapes=({0: tokens}, {0: tokens}),
            strict=False,
        )
    unlifted = exported.module()
    # A plain GraphModule over the same graph, without the pytree (un)flattening, input-check hooks and guards
    # torch.export wraps around it: the compiled graph takes positional tensors, and the runtime owns the contract.
    gm = fx.GraphModule(unlifted, unlifted.graph, class_name="KilnForward")
    gm.graph._codegen = fx.graph.CodeGen()
    output = next(n for n in gm.graph.nodes if n.op == "output")
    output.args = (output.args[0][0] if isinstance(output.args[0], (tuple, list)) else output.args[0],)
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm
