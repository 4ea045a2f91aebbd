"""Quantized matmul kernels (codegen/kernels/quant_matmul) against the kiln:: op references, under the Triton
interpreter on CPU; and cross-compiled for sm_90 and sm_80 at Llama-3.2-1B's MLP size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from kernel_checks import DEVICE, in_clean_processes, launched_at, randn

from kiln.codegen.kernel_plan import Target, run
from kiln.codegen.kernels import quant_matmul_plan as qm
from kiln.ops import quant as Q

K, N = 256, 96


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """float32 activations: IEEE float32 dots (not TF32, on a GPU too) accumulated in another order, so the
    error relative to the output's norm is float32 rounding."""
    err = float((actual.float() - expected.float()).norm() / expected.float().norm())
    assert err < 1e-5, err


@pytest.mark.parametrize("m", [1, 20])
def test_int8_dequant_matmul(m: int) -> None:
    x, w, bias = randn(m, K), randn(N, K), randn(N)
    q, s = Q.quantize_int8(w)
    close(qm.linear_int8(x, q, s, bias), Q.linear_int8(x, q, s, bias))


@pytest.mark.parametrize("group,zero_point", [(32, True), (64, False)])
def test_int4_dequant_matmul(group: int, zero_point: bool) -> None:
    x, w = randn(3, K), randn(N, K)
    qweight, scales, qzeros = Q.quantize_int4(w, group, zero_point)
    input_scale = torch.rand(K, device=DEVICE) + 0.5
    close(
        qm.linear_int4(x, qweight, scales, qzeros, input_scale, None, group),
        Q.linear_int4(x, qweight, scales, qzeros, input_scale, None, group),
    )


def test_split_k_adds_partials_once() -> None:
    x, w, bias = randn(2, 1024), randn(N, 1024), randn(N)
    q, s = Q.quantize_int8(w)
    config = qm.configs(2, "int8", x.dtype)[0]
    assert qm.split_k_for(2, N, 1024, config, Target().split_sms) > 1  # what the launcher picks for this M
    out = torch.zeros(2, N, device=DEVICE)
    run(qm.plan(x, q, s, out, "int8", config, split_k=2, bias=bias))
    close(out, Q.linear_int8(x, q, s, bias))


def test_quantize_rows_is_exact() -> None:
    x = randn(5, K, scale=3.0)
    x[0, :4] = torch.tensor([0.5, 1.5, -2.5, 127.0])  # ties round half to even, as torch.round does
    input_scale = torch.rand(K, device=DEVICE) + 0.5
    q, s = torch.empty(5, K, dtype=torch.int8, device=DEVICE), torch.empty(5, device=DEVICE)
    run(qm.plan_quantize_rows(x, q, s, input_scale))
    ref_q, ref_s = Q.quantize_tokens(x * input_scale)
    assert torch.equal(q, ref_q)
    torch.testing.assert_close(s, ref_s, rtol=0, atol=0)


@pytest.mark.parametrize("m", [1, 20])
def test_w8a8_scaled_int8_matmul(m: int) -> None:
    x, w, bias = randn(m, K), randn(N, K), randn(N)
    q, s = Q.quantize_int8(w)
    input_scale = torch.rand(K, device=DEVICE) + 0.5
    close(qm.linear_w8a8(x, q, s, input_scale, bias), Q.linear_w8a8(x, q, s, input_scale, bias))


QUANT_SCRIPT = """
import json, sys, torch
from dataclasses import asdict
from kiln.codegen.cross_compile import cross_compile
capability, out_dir, config = json.loads(sys.argv[1])
kernels = ["quant_int8", "quant_int4", "quant_int4_zp", "quant_w8a8", "quantize_rows"]
out = []
for dtype in (torch.bfloat16, torch.float32):
    records = cross_compile(config, f"cuda:{capability}", f"{out_dir}/{str(dtype)[6:]}", dtype, kernels=kernels,
                            strict=False, quantized=True)
    out += [{"problems": r.problems(), **asdict(r)} for r in records]
print(json.dumps(out))
"""
LLAMA_1B_MLP = {
    "hidden_size": 2048,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "intermediate_size": 8192,
    "max_position_embeddings": 131072,
}


def test_chosen_configs_cross_compile_for_sm90_and_sm80(tmp_path: Path) -> None:
    """At Llama-3.2-1B's down projection, for bf16 and float32 activations: the configs `choose` picks (what
    the launchers run) fit shared memory and their bounds, without spills."""
    args = [(capability, str(tmp_path), LLAMA_1B_MLP) for capability in (90, 80)]
    records = [r for rs in in_clean_processes(QUANT_SCRIPT, args) for r in rs]
    problems = [f"{r['target']}: {p}" for r in records for p in r["problems"]]
    assert not problems, "\n".join(problems)
    for mode in ("int8", "int4", "int4_zp", "w8a8"):
        assert launched_at(records, f"quant_{mode}", "decode_256") is not launched_at(
            records, f"quant_{mode}", "decode_1"
        )
    launched_at(records, "quantize_rows", "prefill_2048")
    decode = launched_at(records, "quant_w8a8", "decode_1")
    assert "split_k=True" in decode["label"]  # decode splits K to fill the SMs
    assert Path(decode["cubin"]).read_bytes()[:4] == b"\x7fELF"


@pytest.mark.parametrize("spec", ["w8a8:smooth", "int4:g32:zp:awq"])
def test_triton_backend_runs_quantized_models_like_the_reference(checkpoint, spec: str) -> None:
    from hf_reference import run_prefill_then_decode

    import kiln

    path = checkpoint("llama")
    reference, triton = (kiln.compile(path, backend=b, quantization=spec) for b in ("reference", "triton"))
    assert "torch.ops.kiln.linear" not in triton.code
    assert "kiln_codegen_kernels_quant_matmul_plan_linear_" in triton.code
    prompts = [[1, 5, 9, 200, 31, 7, 8], [3, 4]]
    want, want_logits = run_prefill_then_decode(reference, prompts, steps=2)
    got, got_logits = run_prefill_then_decode(triton, prompts, steps=2)
    assert got == want
    for a, b in zip(got_logits, want_logits):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)
