"""Logits pruning: only the last new token of each sequence reaches the LM head.

Prefill of a 500-token prompt needs one row of logits, not 500; on a 32k vocabulary the LM head is the
largest matmul of a small model. The pass gathers `logits_indices` (a graph input the paged-attention rewrite
adds) right before the final linear, so everything after it runs on S rows instead of T.
"""

from __future__ import annotations

import torch
from torch import fx

from .base import GraphPass, PassContext, is_op
from .fuse_common import arg_node

# What may stand between the LM head and the output without depending on the token count.
_ROW_WISE = {"select", "alias", "to", "_to_copy", "div", "tanh", "mul", "add", "float", "getitem"}


class PruneLogits(GraphPass):
    name = "prune_logits"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> dict[str, int]:
        indices = ctx.logits_indices
        if indices is None:
            raise ValueError("prune_logits needs the logits_indices input that paged_attention adds")
        output = next(n for n in gm.graph.nodes if n.op == "output")
        head = output.args[0][0] if isinstance(output.args[0], (tuple, list)) else output.args[0]
        while not is_op(head, "linear", "addmm", "matmul"):
            if not (isinstance(head, fx.Node) and is_op(head, *_ROW_WISE)):
                raise ValueError(f"cannot find the LM head: {head} stands between it and the output")
            head = head.args[0]
        hidden = arg_node(head, 0)
        with gm.graph.inserting_before(head):
            pruned = gm.graph.call_function(torch.ops.aten.index_select.default, (hidden, 1, indices))
        head.replace_input_with(hidden, pruned)
        return {"matched": 1}
