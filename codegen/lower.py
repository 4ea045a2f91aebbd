"""The last pass of each backend: swap each `torch.ops.kiln.X` call in the final graph for what runs it.

Backend "triton": the op's generated-kernel launcher. Plain GEMMs stay on torch (cuBLAS); kiln ops without a
launcher keep their torch implementation. Backend "reference": the function the op was declared from
(`kiln.compiler.fused_ops.rope`, ...), called directly, and `aten.linear` through `cpu_kernels.linear` (a C
loop for the few rows of small-batch decode on CPU, torch otherwise). Graph passes rather than dispatch-key registrations,
so the generated forward says what runs.
"""
from __future__ import annotations

import torch.fx as fx

from kiln.compiler.ops import reference_calls
from kiln.passes.base import GraphPass, PassContext, op_name


class LowerToReference(GraphPass):
    name = "lower_reference"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> dict[str, int]:
        found = reference_calls()
        called = 0
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in found:
                node.target = found[node.target]
                called += 1
        return {"called_directly": called}


class LowerToTriton(GraphPass):
    name = "lower_triton"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> dict[str, int]:
        from .launchers import LOWERINGS  # imports triton: only this backend needs it

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
