"""The kernels the launchers pick compile for H100 (sm_90) and A100 (sm_80) at real model sizes, with no GPU:
within the target's shared memory and their configs' bounds (which `pick` trusts at run time), with no register
spills; and what is compiled is exactly what the launchers launch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from kernel_checks import in_clean_processes, launched_at

from kiln.codegen import cross_compile as xc
from kiln.codegen.kernels import matmul_plan, paged_attention_plan, quant_matmul_plan
from kiln.codegen.model_step import MAX_BLOCKS_PER_SEQ, ModelShapes, ModelStep, step_launches

LLAMA_1B = transformers.LlamaConfig(
    hidden_size=2048,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    intermediate_size=8192,
    num_hidden_layers=16,
    vocab_size=128256,
    max_position_embeddings=131072,
)
HEAD_DIM_128 = transformers.LlamaConfig(  # Llama-3.1-8B's shapes
    hidden_size=4096,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    intermediate_size=14336,
    num_hidden_layers=32,
    vocab_size=128256,
    max_position_embeddings=131072,
)
MODELS = {"llama_1b": LLAMA_1B, "head_dim_128": HEAD_DIM_128}
# fp16 compiles like bf16 (same tiles, same paths): once is enough.
CHECKS = [
    ("llama_1b", "float32"),
    ("llama_1b", "bfloat16"),
    ("llama_1b", "float16"),
    ("head_dim_128", "float32"),
    ("head_dim_128", "bfloat16"),
]
TARGETS = ("cuda:90", "cuda:80")

SCRIPT = """
import json, sys, torch
from dataclasses import asdict
from kiln.codegen.cross_compile import cross_compile
target, out_dir, checks = json.loads(sys.argv[1])
out = []
for model, config, dtype in checks:
    for r in cross_compile(config, target, f"{out_dir}/{model}_{dtype}", getattr(torch, dtype), strict=False):
        out.append({"model": model, "dtype": dtype, "problems": r.problems(), **asdict(r)})
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Every kernel of every check, compiled for both targets (one process per target, side by side)."""
    out_dir = str(tmp_path_factory.mktemp("kernels"))
    checks = [(model, MODELS[model].to_dict(), dtype) for model, dtype in CHECKS]
    return [r for records in in_clean_processes(SCRIPT, [(t, out_dir, checks) for t in TARGETS]) for r in records]


def test_launcher_choices_fit_sm90_and_sm80(compiled: list[dict[str, Any]]) -> None:
    problems = [f"{r['target']} {r['model']} {r['dtype']}: {p}" for r in compiled for p in r["problems"]]
    assert not problems, "\n".join(problems)
    for target in TARGETS:
        for model, dtype in CHECKS:
            records = [r for r in compiled if (r["target"], r["model"], r["dtype"]) == (target, model, dtype)]
            for kernel in ("rms_norm", "add_rms_norm", "silu_mul", "rope", "cache_write", "attention_merge"):
                launched_at(records, kernel, "decode_1")
            assert launched_at(records, "attention", "decode_1")["config"]["NUM_SPLITS"] > 1  # batch 1 splits
            assert launched_at(records, "attention", "decode_256")["config"]["NUM_SPLITS"] == 1
            assert launched_at(records, "attention", "prefill_512")["steps"] == ["prefill_512", "prefill_2048"]
            # Each split count some CUDA graph's batch size picks is compiled (Llama-1B has 8 KV heads).
            splits = {r["config"]["NUM_SPLITS"] for r in records if r["name"].startswith("attention_decode_")}
            assert splits == {1, 2, 4, 8, 16}
            assert all(
                r["shared_bound"] is not None
                for r in records
                if r["name"].startswith(("attention_", "matmul_")) and not r["name"].startswith("attention_merge")
            )
    record = compiled[0]
    assert Path(record["cubin"]).read_bytes()[:4] == b"\x7fELF"
    assert "@triton.jit" in Path(record["source"]).read_text()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float32_dots_are_ieee_and_16_bit_dots_keep_the_default(dtype: torch.dtype) -> None:
    # On a GPU a float32 tl.dot is TF32 unless told otherwise (the interpreter cannot tell the difference).
    target = xc.TARGETS[90]
    planned = step_launches(
        ModelStep(ModelShapes.from_config(LLAMA_1B), dtype, target, "prefill_512", 4, 512, quantized=True)
    )
    dots = [
        line
        for p in planned
        for line in p.launch.source().splitlines()
        if "tl.dot(" in line and "out_dtype=tl.int32" not in line
    ]  # W8A8's int8 dot has no float precision
    assert len(dots) >= 4 and all(('input_precision="ieee"' in line) == (dtype == torch.float32) for line in dots)


def _capture(monkeypatch: pytest.MonkeyPatch, module: Any, target: xc.Target) -> list:
    """The launches `module`'s launchers make for a device like `target`, captured instead of run."""
    launches: list = []
    monkeypatch.setattr(module, "device_target", lambda device: target)
    monkeypatch.setattr(module, "run", launches.append)
    return launches


def _what(launch: Any) -> tuple:
    """Everything of a launch that decides which kernel is compiled and how it is gridded."""
    return (launch.kernel, launch.flags, launch.constexprs, launch.num_warps, launch.num_stages, launch.grid)


@pytest.mark.parametrize("capability", [90, 80])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_compile_plans_what_the_attention_launcher_launches(
    monkeypatch, capability: int, dtype: torch.dtype
) -> None:
    target, shapes = xc.TARGETS[capability], ModelShapes.from_config(HEAD_DIM_128)
    launched = _capture(monkeypatch, paged_attention_plan, target)
    for step, seqs, query_len in xc.STEPS:
        t = seqs * query_len
        q = torch.empty(t, shapes.heads, shapes.head_dim, dtype=dtype)
        k = torch.empty(t, shapes.kv_heads, shapes.head_dim, dtype=dtype)
        cache = torch.empty(8, 16, shapes.kv_heads, shapes.head_dim, dtype=dtype)
        launched.clear()
        tables = torch.empty(seqs, MAX_BLOCKS_PER_SEQ, dtype=torch.int32)
        query_start_loc = torch.arange(seqs + 1, dtype=torch.int32) * query_len
        seq_lens, slots = torch.empty(seqs, dtype=torch.int32), torch.empty(t, dtype=torch.int64)
        paged_attention_plan.paged_attention(
            q, k, k, cache, cache, slots, tables, seq_lens, query_start_loc, shapes.head_dim**-0.5, 0, 0.0
        )
        planned = [
            p.launch
            for p in step_launches(ModelStep(shapes, dtype, target, step, seqs, query_len))
            if p.kernel in ("cache_write", "attention", "attention_merge")
        ]
        assert [_what(launch) for launch in launched] == [_what(launch) for launch in planned], step


@pytest.mark.parametrize("capability", [90, 80])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_compile_plans_what_the_quant_launchers_launch(monkeypatch, capability: int, dtype: torch.dtype) -> None:
    target, group = xc.TARGETS[capability], quant_matmul_plan.MODEL_GROUP_SIZE
    n, k = LLAMA_1B.hidden_size, LLAMA_1B.intermediate_size
    launched = _capture(monkeypatch, quant_matmul_plan, target)
    planned = {
        (p.kernel, p.step): p.launch
        for p in xc.model_launches(ModelShapes.from_config(LLAMA_1B), dtype, target, quantized=True)
    }
    for step, seqs, query_len in xc.STEPS:
        x = torch.empty(seqs * query_len, k, dtype=dtype)
        q8, s8 = torch.empty(n, k, dtype=torch.int8), torch.empty(n)
        q4, s4 = torch.empty(k // 8, n, dtype=torch.int32), torch.empty(k // group, n)
        zeros = torch.empty(k // group, n // 8, dtype=torch.int32)
        for kernel, launcher, args in (
            ("quant_int8", quant_matmul_plan.linear_int8, (x, q8, s8, None)),
            ("quant_int4_zp", quant_matmul_plan.linear_int4, (x, q4, s4, zeros, None, None, group)),
            ("quant_w8a8", quant_matmul_plan.linear_w8a8, (x, q8, s8, None, None)),
        ):
            launched.clear()
            launcher(*args)
            assert _what(launched[-1]) == _what(planned[(kernel, step)]), (kernel, step)


def test_a_lower_shared_limit_picks_the_next_config(tmp_path: Path) -> None:
    first, second = matmul_plan.configs(2048, torch.bfloat16)[:2]
    limit = (first.shared_bytes + second.shared_bytes) // 2  # between the two candidates' bounds
    records = xc.cross_compile(LLAMA_1B, out_dir=tmp_path, shared_limit=limit, kernels=["matmul_qkv"])
    prefill = next(r for r in records if "prefill_2048" in r.steps)
    assert prefill.config["BLOCK_N"] == second.blocks["BLOCK_N"] and prefill.shared_bytes <= limit


def test_problems_name_the_kernel_and_what_does_not_fit() -> None:
    # The int4 matmul config that failed on an H200 (Triton 3.6): 246,784 bytes against 232,448, and spills.
    record = xc.KernelRecord(
        "quant_int4_zp_decode_1",
        "quant_matmul.kernel",
        "cuda:90",
        ["decode_1"],
        {"BLOCK_K": 128},
        4,
        3,
        246_784,
        0,
        255,
        344,
        xc.TARGETS[90].shared_limit,
    )
    problems = record.problems()
    assert len(problems) == 3 and all(p.startswith("quant_int4_zp_decode_1 {'BLOCK_K': 128}") for p in problems)
    assert "246784 bytes of shared memory > the limit 232448" in problems[0]


def test_unknown_target_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cuda:<capability>"):
        xc.cross_compile(LLAMA_1B, target="rocm", out_dir=tmp_path)
