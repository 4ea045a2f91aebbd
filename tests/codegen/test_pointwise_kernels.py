"""rms_norm, gated activations, rope, the generic pointwise chain and the epilogue GEMM against their torch
references, on fresh random ragged inputs with NaN-poisoned outputs (interpreter on CPU, real on a GPU)."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import DEVICE, assert_close, poisoned, randn

from kiln import ops  # noqa: F401  (declares the kiln:: ops and their references)
from kiln.codegen.kernel_plan import run
from kiln.codegen.kernels import gated_act_plan as gated_act
from kiln.codegen.kernels import matmul_plan as matmul
from kiln.codegen.kernels import pointwise_plan as pointwise
from kiln.codegen.kernels import rms_norm_plan as rms_norm
from kiln.codegen.kernels import rope_plan as rope

kiln = torch.ops.kiln
DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES + [torch.bfloat16])
@pytest.mark.parametrize("weight_offset", [0.0, 1.0])
def test_rms_norm_and_fused_residual(dtype: torch.dtype, weight_offset: float) -> None:
    x, res = randn(5, 100, dtype=dtype), randn(5, 100, dtype=dtype)  # 100 columns: a ragged 128-wide tile
    w = randn(100, dtype=dtype, scale=0.5)
    out = poisoned(5, 100, dtype=dtype)
    run(rms_norm.plan(x, w, out, 1e-5, weight_offset))
    assert_close(out, kiln.rms_norm(x, w, 1e-5, weight_offset))
    out, res_out = poisoned(5, 100, dtype=dtype), poisoned(5, 100, dtype=dtype)
    run(rms_norm.plan(x, w, out, 1e-5, weight_offset, res, res_out))
    ref_out, ref_res = kiln.add_rms_norm(x, res, w, 1e-5, weight_offset)
    assert_close(res_out, ref_res)
    assert_close(out, ref_out)
    # The op-level launcher keeps leading dims ([batch, tokens, hidden] as captured graphs pass it).
    expected = kiln.rms_norm(x, w, 1e-5, weight_offset).view(1, 5, 100)
    assert_close(rms_norm.rms_norm(x.view(1, 5, 100), w, 1e-5, weight_offset), expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_activations_over_column_tiles(dtype: torch.dtype) -> None:
    gate_up = randn(3, 2 * 1100, dtype=dtype)  # 1100 columns: two 1024-wide tiles, the second ragged
    for act, expected in (
        ("silu", kiln.silu_mul(gate_up)),
        ("gelu", kiln.gelu_mul(gate_up, "none")),
        ("gelu_tanh", kiln.gelu_mul(gate_up, "tanh")),
    ):
        out = poisoned(3, 1100, dtype=dtype)
        run(gated_act.plan(gate_up, out, act))
        assert_close(out, expected)
    assert_close(gated_act.gelu_mul(gate_up, "tanh"), kiln.gelu_mul(gate_up, "tanh"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_pointwise_chain_and_row_reduction(dtype: torch.dtype) -> None:
    a, b, c = (randn(4, 70, dtype=dtype) for _ in range(3))
    expected = (torch.nn.functional.silu(a.float()) * b.float() + 0.5 * torch.tanh(c.float())).to(dtype)
    chain = pointwise.Chain(("a", "b", "c"), "silu(a) * b + alpha * tanh(c)", ("alpha",))
    out = poisoned(4, 70, dtype=dtype)
    run(pointwise.plan(chain, {"a": a, "b": b, "c": c}, {"alpha": 0.5}, out))
    assert_close(out, expected)
    row_max = poisoned(4, dtype=torch.float32)
    run(pointwise.plan(pointwise.Chain(("a", "b"), "a * b", reduce="max"), {"a": a, "b": b}, {}, row_max))
    assert_close(row_max, (a.float() * b.float()).amax(-1))


def _cos_sin(max_pos: int, rotary_dim: int) -> torch.Tensor:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
    freqs = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], -1).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("neox_style", [True, False])
@pytest.mark.parametrize("rotary_dim", [32, 16])  # full and partial rotary of head_dim 32
def test_rope_ragged_positions(dtype: torch.dtype, neox_style: bool, rotary_dim: int) -> None:
    positions = torch.tensor([0, 1, 2, 7, 8, 3, 40], device=DEVICE)  # three sequences at different offsets
    q, k = randn(7, 6, 32, dtype=dtype), randn(7, 2, 32, dtype=dtype)
    cache = _cos_sin(64, rotary_dim)
    ref_q, ref_k = kiln.rope(q, k, positions, cache, rotary_dim, neox_style)
    q_out, k_out = poisoned(7, 6, 32, dtype=dtype), poisoned(7, 2, 32, dtype=dtype)
    run(rope.plan(q, k, q_out, k_out, positions, cache, rotary_dim, neox_style))
    assert_close(q_out, ref_q)
    assert_close(k_out, ref_k)
    run(rope.plan(q, k, q, k, positions, cache, rotary_dim, neox_style))  # in place
    assert_close(q, ref_q)
    assert_close(k, ref_k)


@pytest.mark.parametrize("dtype", DTYPES + [torch.bfloat16])
@pytest.mark.parametrize("m", [3, 40])  # the decode config (16-row tiles) and the prefill one
def test_matmul_epilogue(dtype: torch.dtype, m: int) -> None:
    a, b = randn(m, 80, dtype=dtype), randn(48, 80, dtype=dtype, scale=0.1)
    bias, residual = randn(48, dtype=dtype), randn(m, 48, dtype=dtype)
    config = matmul.configs(m, dtype)[-1]  # the smallest tiles: cover a ragged edge in both M and N
    for kwargs in ({}, {"bias": bias, "activation": "silu", "residual": residual}):
        out = poisoned(m, 48, dtype=dtype)
        run(matmul.plan(a, b, out, config, **kwargs))
        expected = matmul.reference(
            a, b, kwargs.get("bias"), kwargs.get("activation", "none"), kwargs.get("residual"), dtype
        )
        assert_close(out, expected)
