"""fuse_activation: act(gate) * up over the fused gate/up matmul becomes kiln::silu_mul / kiln::gelu_mul."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_fuse_linears import assert_same_logits, only

import kiln
import kiln.ops  # declares the kiln:: ops the op tests call
from kiln.passes.base import op_counts, op_name


@pytest.mark.parametrize(
    "arch, op, act", [("llama", "kiln.silu_mul", "aten.silu"), ("gemma", "kiln.gelu_mul", "aten.gelu")]
)
def test_gated_activation_is_one_op(checkpoint, arch, op, act):
    path = checkpoint(arch)
    linears = kiln.compile(path, **only("fuse_linears"))
    fused = kiln.compile(path, **only("fuse_linears", "fuse_activation"))
    before, after = op_counts(linears.graph_module), op_counts(fused.graph_module)
    assert before[act] == 2 and before[op] == 0
    assert after[act] == 0 and after[op] == 2 and after["aten.mul"] == before["aten.mul"] - 2
    assert_same_logits(linears, fused)


def test_gemma_keeps_tanh_approximation(checkpoint):
    fused = kiln.compile(checkpoint("gemma"), **only("fuse_linears", "fuse_activation"))
    calls = [n for n in fused.graph_module.graph.nodes if op_name(n) == "kiln.gelu_mul"]
    assert [c.args[1] for c in calls] == ["tanh", "tanh"]  # gelu_pytorch_tanh


def test_separate_gate_and_up_are_left_alone(checkpoint):
    """Without fuse_linears there is no [T, 2I] tensor to hand the op; the pattern must not match."""
    fused = kiln.compile(checkpoint("llama"), **only("fuse_activation"))
    assert op_counts(fused.graph_module)["kiln.silu_mul"] == 0
    assert fused.report.records[3].counters == {"silu_mul": 0, "gelu_mul": 0}


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_op_references(approximate):
    gate_up = torch.randn(5, 2 * 24, dtype=torch.bfloat16)
    gate, up = gate_up.split(24, -1)
    assert torch.equal(torch.ops.kiln.silu_mul(gate_up), F.silu(gate) * up)
    assert torch.equal(torch.ops.kiln.gelu_mul(gate_up, approximate), F.gelu(gate, approximate=approximate) * up)
