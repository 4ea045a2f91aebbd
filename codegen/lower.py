"""Backend "triton": swap each `torch.ops.kiln.X` call in the final graph for its generated-kernel launcher.

A graph pass rather than a dispatch-key registration, so the generated forward says what runs:
`kiln_codegen_launchers_paged_attention(...)` where the reference backend calls `torch.ops.kiln...`.
Plain GEMMs stay on torch (cuBLAS); kiln ops without a launcher keep their torch implementation.
"""
from __future__ import annotations

import torch.fx as fx

from kiln.passes.base import GraphPass, PassContext, op_name

from .launchers import LOWERINGS


class LowerToTriton(GraphPass):
    name = "lower_triton"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> dict[str, int]:
        lowered = kept = 0
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            name = op_name(node)
            launcher = LOWERINGS.get(name)
            if launcher is not None:
                node.target = launcher
                lowered += 1
            elif name.startswith("kiln."):
                kept += 1
        return {"lowered": lowered, "kept_reference": kept}
