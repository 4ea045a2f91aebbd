"""Each pass alone and in the pipeline: graph effects by op counts, numbers by comparison with HF."""

from __future__ import annotations

import pytest
import torch
from hf_reference import run_prefill_then_decode

import kiln
from kiln.compiler.capture import capture
from kiln.models.loader import load_model
from kiln.models.registry import layer_windows
from kiln.passes.base import PassContext, PassReport, op_counts, op_name, run_passes
from kiln.passes.cleanup import Cleanup
from kiln.passes.paged_attention import PagedAttention

MASK_OPS = {"aten.diff", "aten.cumsum", "aten.arange", "aten.le", "aten.__and__", "aten.new_ones", "aten.where"}


def _captured(path):
    loaded = load_model(path)
    gm = capture(loaded.model, 512)
    ctx = PassContext(config=loaded.model.config, layer_windows=layer_windows(loaded.model.config))
    return gm, ctx


def _placeholders(gm) -> list[str]:
    return [n.target for n in gm.graph.nodes if n.op == "placeholder"]


def test_cleanup_removes_asserts_and_noops(checkpoint):
    gm, ctx = _captured(checkpoint("gpt2"))
    before = op_counts(gm)
    assert before["aten._assert_tensor_metadata"] > 0 and before["aten.dropout"] > 0
    counters = Cleanup().run(gm, ctx)
    after = op_counts(gm)
    assert after["aten._assert_tensor_metadata"] == 0 and after["aten.dropout"] == 0 and after["aten.alias"] == 0
    # Deferred runtime asserts (capture asks for them instead of guards) are dropped with the others.
    assert counters["asserts"] == before["aten._assert_tensor_metadata"] + before["aten._assert_scalar"]
    assert counters["noops"] >= before["aten.dropout"]


@pytest.mark.parametrize("arch", ["llama", "gemma2"])  # the SDPA form and the eager (soft-capped) form
def test_paged_attention_rewrites_every_attention(checkpoint, arch):
    gm, ctx = _captured(checkpoint(arch))
    layers = ctx.config.num_hidden_layers
    report = PassReport()
    run_passes(gm, [Cleanup(), PagedAttention(), Cleanup()], ctx, report)
    ops = op_counts(gm)
    assert ops["kiln.paged_attention"] == layers
    assert ops["aten.scaled_dot_product_attention"] == 0 and ops["aten.softmax"] == 0
    assert not MASK_OPS & {k for k, v in ops.items() if v}, "causal-mask construction survived"
    names = _placeholders(gm)
    assert [f"k_cache_{i}" for i in range(layers)] == [n for n in names if n.startswith("k_cache")]
    assert report.records[1].counters["matched"] == layers
    assert ctx.kv_shapes == [(2, 16, 16)] * layers  # KV heads kept, not repeated


def test_eager_softcap_is_detected(checkpoint):
    gm, ctx = _captured(checkpoint("gemma2"))
    PagedAttention().run(gm, ctx)
    calls = [n for n in gm.graph.nodes if op_name(n) == "kiln.paged_attention"]
    assert [c.args[-1] for c in calls] == [5.0, 5.0]  # attn_logit_softcapping
    assert [c.args[-2] for c in calls] == [16, 0]  # gemma2 alternates sliding and full layers
    assert calls[0].args[-3] == pytest.approx(16**-0.5)  # query_pre_attn_scalar


def test_prune_logits_only_last_token_reaches_lm_head(checkpoint):
    path = checkpoint("llama")
    pruned, full = kiln.compile(path), kiln.compile(path, prune_logits=False)
    assert op_counts(pruned.graph_module)["aten.index_select"] == 1
    assert op_counts(full.graph_module)["aten.index_select"] == 0
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    _, a = run_prefill_then_decode(pruned, prompts, steps=2)
    _, b = run_prefill_then_decode(full, prompts, steps=2)
    for x, y in zip(a, b):
        assert x.shape == (2, pruned.vocab_size)
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_report_records_every_pass(checkpoint):
    compiled = kiln.compile(checkpoint("llama"))
    names = [r.name for r in compiled.report.records]
    assert names[:3] == ["cleanup", "paged_attention", "prune_logits"]
    assert names[-3:] == ["final_cleanup", "lower_reference", "flatten_attrs"]
    text = compiled.report.format()
    assert "paged_attention" in text and "matched=2" in text
    assert compiled.report.ops_final["kiln.paged_attention"] == 2
    assert "kiln_backends_cpu_lowering_paged_attention(" in compiled.code  # backend "reference" calls it directly
    # Weights are read as flat attributes of the graph module, and the captured module tree is gone.
    assert "self.model_model_layers_0_mlp_down_proj_weight" in compiled.code and "self.model." not in compiled.code
    assert not dict(compiled.graph_module.named_children()).get("model")


def test_unknown_compile_option_is_refused(checkpoint):
    with pytest.raises(ValueError, match="fuse_everything"):
        kiln.compile(checkpoint("llama"), fuse_everything=True)
    with pytest.raises(ValueError, match="backend"):
        kiln.compile(checkpoint("llama"), backend="tpu")
