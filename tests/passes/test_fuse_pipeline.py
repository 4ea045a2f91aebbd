"""All fusions together: the decode step in a handful of ops per layer, visible in the report."""

from __future__ import annotations

from test_fuse_linears import FUSIONS, assert_same_logits, only

import kiln
from kiln.passes.base import layer_op_counts


def test_llama_layers_have_at_most_12_ops(checkpoint):
    path = checkpoint("llama")
    fused, plain = kiln.compile(path), kiln.compile(path, **only())
    per_layer = layer_op_counts(fused.graph_module, 2)
    assert max(per_layer) <= 12, per_layer
    assert min(layer_op_counts(plain.graph_module, 2)) > 2 * max(per_layer)
    assert_same_logits(plain, fused)


def test_report_lists_each_fusion_and_ops_per_layer(checkpoint):
    report = kiln.compile(checkpoint("llama")).report
    counters = {r.name: r.counters for r in report.records}
    assert list(counters)[3:-3] == list(FUSIONS)
    assert list(counters)[-3:] == ["final_cleanup", "lower_reference", "flatten_attrs"]
    assert counters["fuse_rope"]["matched"] == 2 and counters["fuse_norm"]["add_rms_norm"] == 4
    before, after = report.layer_ops
    assert len(before) == len(after) == 2 and max(after) <= 12 < min(before)
    text = report.format()
    assert f"compute ops per decoder layer: {before} -> {after}" in text
    assert "fuse_activation    silu_mul=2" in text
