"""Every generated kernel compiles for H100 (sm_90) at Llama-3.2-1B's sizes with no GPU: within the 227 KB of
shared memory a block may use and with no register spills; a config that does not fit is pruned."""
from __future__ import annotations

from pathlib import Path

import pytest
import transformers

from kiln.codegen import cross_compile as xc
from kiln.codegen.templates import matmul

LLAMA_1B = transformers.LlamaConfig(
    hidden_size=2048, num_attention_heads=32, num_key_value_heads=8, head_dim=64, intermediate_size=8192,
    num_hidden_layers=16, vocab_size=128256, max_position_embeddings=131072,
)


def test_llama_1b_kernels_fit_h100(tmp_path: Path) -> None:
    records = xc.cross_compile(LLAMA_1B, target="cuda:90", out_dir=tmp_path)
    names = {r.name for r in records}
    assert {"rms_norm", "add_rms_norm", "silu_mul", "rope", "cache_write", "attention_prefill", "attention_decode",
            "attention_decode_split", "attention_merge", "matmul_down_residual"} <= names
    for r in records:
        assert r.shared_bytes <= 227 * 1024 and r.spill_bytes == 0 and r.registers > 0, r
        assert Path(r.cubin).read_bytes()[:4] == b"\x7fELF"
        assert "@triton.jit" in Path(r.source).read_text()
    assert (tmp_path / "sm_90" / "records.json").is_file()


def test_configs_over_the_shared_limit_are_pruned(tmp_path: Path) -> None:
    first, second = matmul.configs(2048, 2)[:2]
    limit = (first.shared_bytes + second.shared_bytes) // 2  # between the two candidates' needs
    (record,) = xc.cross_compile(LLAMA_1B, out_dir=tmp_path, shared_limit=limit, kernels=["matmul_qkv"])
    assert [p["config"]["BLOCK_N"] for p in record.pruned] == [first.blocks["BLOCK_N"]]
    assert record.config["BLOCK_N"] == second.blocks["BLOCK_N"] and record.shared_bytes <= limit


def test_unknown_target_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cuda:<capability>"):
        xc.cross_compile(LLAMA_1B, target="rocm", out_dir=tmp_path)
