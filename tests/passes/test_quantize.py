"""quantize: linears become quantized kiln ops over packed weights (old weights gone), attention reads an int8 /
fp8 cache, the report carries accuracy; AWQ and SmoothQuant lower the error on outlier activations."""

from __future__ import annotations

import pytest
import torch
from hf_reference import run_prefill_then_decode

import kiln
from kiln.ops import quant as Q
from kiln.passes import quant_calibrate as cal
from kiln.passes.base import op_counts
from kiln.passes.quant_config import QuantConfig
from kiln.passes.quant_rewrite import int4_forward, w8a8_forward

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]


def outlier_activations(tokens: int = 256, k: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations with a few large channels, as trained LLMs have them, and a random weight."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, k, generator=g)
    x[:, :4] *= 30.0
    return x, torch.randn(128, k, generator=g)


def test_int8_rewrites_every_linear_but_the_head(checkpoint) -> None:
    compiled = kiln.compile(checkpoint("llama"), quantization="int8")
    ops = op_counts(compiled.graph_module)
    # qkv, o, gate_up, down per layer, their weights in the CPU kernel's tiles; the head kept
    assert ops["kiln.linear_int8_packed"] == 2 * 4 and ops["aten.linear"] == 1
    names = {n for n, _ in [*compiled.graph_module.named_parameters(), *compiled.graph_module.named_buffers()]}
    assert not any(n.endswith(("q_k_v_proj_weight", "gate_up_proj_weight", "o_proj_weight")) for n in names)
    assert "model_model_layers_0_self_attn_q_k_v_proj_weight_qweight_tiled" in names
    q = compiled.report.quantization
    assert q["weight_bytes"][1] < q["weight_bytes"][0] / 3.5
    assert q["top1_agreement"] >= 0.9 and len(q["layer_errors"]) == 2 and max(q["layer_errors"]) < 0.02
    assert "teacher-forced top-1 agreement" in compiled.report.format()
    assert "on CPU (backend reference) int8 runs kiln's C loop over 16-channel" in compiled.report.format()


def test_int4_with_head_and_w8a8_stay_close_to_fp32(checkpoint) -> None:
    path = checkpoint("llama")
    plain = kiln.compile(path)
    _, want = run_prefill_then_decode(plain, PROMPTS, steps=2)
    # Logit error compounds over layers on a random model; unrelated logits would be ~1.4 apart.
    for spec, layer_tol, logit_tol in (("int4:g32:zp:head", 0.12, 0.5), ("w8a8:smooth", 0.02, 0.05)):
        compiled = kiln.compile(path, quantization=spec)
        ops = op_counts(compiled.graph_module)
        assert ops["aten.linear"] == (0 if spec.endswith("head") else 1), spec
        assert max(compiled.report.quantization["layer_errors"]) < layer_tol
        _, got = run_prefill_then_decode(compiled, PROMPTS, steps=2)
        err = max(float((a - b).norm() / b.norm()) for a, b in zip(got, want))
        assert err < logit_tol, (spec, err)


def test_awq_and_smoothquant_lower_the_error_on_outlier_channels() -> None:
    x, w = outlier_activations()
    ref = x @ w.t()
    cfg = QuantConfig.parse("int4:g64")
    rtn = cal.relative_error(int4_forward(cfg)(x, w), ref)
    scale, awq = cal.search_input_scale(x, w, int4_forward(cfg), cal.awq_candidates(x))
    assert scale is not None and awq < 0.8 * rtn
    plain = cal.relative_error(w8a8_forward(x, w), ref)
    scale, smooth = cal.search_input_scale(x, w, w8a8_forward, cal.smooth_candidates(x, w))
    assert scale is not None and smooth < 0.8 * plain


def test_w8a8_token_result_does_not_depend_on_the_batch() -> None:
    x, w = outlier_activations(tokens=8)
    q, s = Q.quantize_int8(w)
    alone = torch.cat([Q.linear_w8a8(x[i : i + 1], q, s, None, None) for i in range(8)])
    assert torch.equal(alone, Q.linear_w8a8(x, q, s, None, None))


def test_int4_packing_is_gptq_layout() -> None:
    q = torch.randint(0, 16, (256, 24), dtype=torch.int32)
    packed = Q.pack_int4(q, dim=0)
    assert packed.shape == (32, 24) and packed.dtype == torch.int32
    assert torch.equal((packed[1] >> 12) & 0xF, q[8 + 3])  # k = 11: word 1, shift (11 % 8) * 4
    assert torch.equal(Q.unpack_int4(packed, dim=0), q)


@pytest.mark.parametrize("kv", ["int8", "fp8_e4m3"])
def test_quantized_kv_cache_doubles_blocks_and_keeps_greedy_tokens(checkpoint, kv: str) -> None:
    path = checkpoint("llama")
    plain, quant = kiln.compile(path), kiln.compile(path, kv_cache_dtype=kv)
    assert op_counts(quant.graph_module)["kiln.paged_attention_quant"] == 2
    # fp32: 4 bytes per element; int8/fp8: 1, plus a 4-byte scale per 16-element vector: 3.2x the blocks
    assert quant.kv_cache_bytes_per_block(16) * 16 == plain.kv_cache_bytes_per_block(16) * 5
    caches = quant.allocate_kv_cache(3, 16)
    assert caches[0].dtype == Q.KV_CACHE_DTYPES[kv] and caches[0].shape == (3, 16, 2, 16 + Q.SCALE_BYTES)
    want, _ = run_prefill_then_decode(plain, PROMPTS, steps=4)
    got, _ = run_prefill_then_decode(quant, PROMPTS, steps=4)
    assert got == want
    assert quant.report.quantization["top1_agreement"] >= 0.9


def test_reference_backend_tiles_w8a8_weights_for_the_cpu_kernel(checkpoint) -> None:
    compiled = kiln.compile(checkpoint("llama"), quantization="w8a8")
    ops = op_counts(compiled.graph_module)
    assert ops["kiln.linear_w8a8_packed"] == 2 * 4 and ops["kiln.linear_w8a8"] == 0
    record = next(r for r in compiled.report.records if r.name == "lower_reference")
    assert record.counters["int8_weights_tiled"] == 2 * 4
    names = {n for n, _ in compiled.graph_module.named_buffers()}
    assert "model_model_layers_0_self_attn_q_k_v_proj_weight_qweight_tiled" in names
    assert "model_model_layers_0_self_attn_q_k_v_proj_weight_qweight" not in names  # repacked, not duplicated


def test_llm_takes_quantization_options(checkpoint) -> None:
    llm = kiln.LLM(checkpoint("llama"), quantization="w8a8", kv_cache_dtype="int8", num_kv_blocks=16)
    assert llm.model.kv_cache_dtype == "int8" and llm.model.report.quantization["mode"] == "w8a8"
    (out,) = llm.generate([[5, 6, 7]], {"max_tokens": 3, "temperature": 0.0}, use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 3


@pytest.mark.parametrize(
    "spec,kv,match",
    [("int4:g48", None, "g48"), ("int8:awq", None, "awq"), ("int3", None, "int3"), (None, "int4", "kv_cache_dtype")],
)
def test_bad_specs_are_refused(spec: str | None, kv: str | None, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        QuantConfig.parse(spec, kv)
