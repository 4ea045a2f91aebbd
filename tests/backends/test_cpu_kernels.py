"""The CPU backend's C kernels, as backend "reference" calls them (backends/cpu/lowering.py), against the ops'
own pure-torch references (the specification)."""

from __future__ import annotations

import pytest
import torch

from kiln.backends.cpu import kernels as cpu_kernels
from kiln.backends.cpu import lowering
from kiln.ops import fused, quant

pytestmark = pytest.mark.skipif(cpu_kernels._library() is None, reason="no C compiler: the torch references run")


def _both(monkeypatch, kernel, op, *args):
    """(C result, torch reference result) of op `op` on the same inputs; checks that `kernel` ran for the first."""
    calls = []
    with monkeypatch.context() as m:
        real = getattr(cpu_kernels, kernel)
        m.setattr(cpu_kernels, kernel, lambda *a: calls.append(1) or real(*a))
        fast = getattr(lowering, op)(*args)
    assert calls, f"the C kernel {kernel} did not run"
    return fast, getattr(fused, op)(*args)


def _assert_close(fast, ref):
    for a, b in zip(fast if isinstance(fast, tuple) else (fast,), ref if isinstance(ref, tuple) else (ref,)):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("rows", [1, 7, 300])  # 300 x 384 crosses the multi-threaded size
@pytest.mark.parametrize("weight_offset", [0.0, 1.0])
def test_rms_norm_and_residual_add(monkeypatch, rows, weight_offset):
    gen = torch.Generator().manual_seed(rows)
    base = torch.randn(rows, 3 * 384, generator=gen)
    x, residual = base[:, :384], torch.randn(rows, 384, generator=gen)  # x is a strided view, as after a split
    weight = torch.randn(384, generator=gen)
    _assert_close(*_both(monkeypatch, "rms_norm", "rms_norm", x, weight, 1e-6, weight_offset))
    _assert_close(*_both(monkeypatch, "rms_norm", "add_rms_norm", x, residual, weight, 1e-6, weight_offset))


@pytest.mark.parametrize("rows", [1, 5, 64])
def test_silu_mul_including_saturated_inputs(monkeypatch, rows):
    gate_up = torch.randn(rows, 2 * 1408, generator=torch.Generator().manual_seed(rows)) * 8
    gate_up[0, :4] = torch.tensor([-200.0, 200.0, 0.0, -88.5])
    _assert_close(*_both(monkeypatch, "silu_mul", "silu_mul", gate_up))


@pytest.mark.parametrize("neox_style", [True, False])
@pytest.mark.parametrize("rotary_dim", [64, 32])  # full and partial rotary
def test_rope_on_strided_qkv_split(monkeypatch, neox_style, rotary_dim):
    gen = torch.Generator().manual_seed(rotary_dim)
    tokens, heads, kv_heads, dim = 9, 4, 2, 64
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen)
    q, k, _ = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], -1)
    q, k = q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim)
    cache = torch.randn(50, rotary_dim, generator=gen)
    positions = torch.randint(0, 50, (tokens,), generator=gen)
    _assert_close(*_both(monkeypatch, "rope", "rope", q, k, positions, cache, rotary_dim, neox_style))


def test_out_of_range_positions_and_slots_are_errors_not_writes():
    q = torch.randn(2, 1, 8)
    with pytest.raises(IndexError, match="position"):
        cpu_kernels.rope(q, torch.tensor([0, 50]), torch.randn(50, 8), 8, True)
    k_cache, v_cache = torch.zeros(2, 4, 1, 8), torch.zeros(2, 4, 1, 8)
    with pytest.raises(IndexError, match="slot"):
        cpu_kernels.cache_write(q, q, k_cache, v_cache, torch.tensor([3, 8]))
    assert not k_cache.any()  # nothing written before the error
    cpu_kernels.cache_write(q, q, k_cache, v_cache, torch.tensor([-1, 5]))  # -1: a padding row, skipped
    assert torch.equal(k_cache.view(8, 8)[5], q[1, 0]) and k_cache.view(8, 8)[torch.arange(8) != 5].eq(0).all()


@pytest.mark.parametrize("rows", [1, 5, cpu_kernels.SMALL_LINEAR_ROWS])
@pytest.mark.parametrize("with_bias", [False, True])
def test_small_linear_matches_torch(rows, with_bias):
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(203, 96, generator=gen)  # 203 outputs: a remainder after the blocks of eight
    bias = torch.randn(203, generator=gen) if with_bias else None
    x = torch.randn(1, rows, 2 * 96, generator=gen)[..., 96:]  # [1, T, K] as in the graph, strided rows
    out = cpu_kernels.linear(x, weight, bias)
    assert out.shape == (1, rows, 203)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_linear_hands_many_rows_and_other_dtypes_to_torch(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_library", lambda: pytest.fail("the C loop ran"))
    many = torch.randn(cpu_kernels.SMALL_LINEAR_ROWS + 1, 8)
    for x, w in [(many, torch.randn(4, 8)), (torch.randn(2, 8, dtype=torch.float64), torch.randn(4, 8).double())]:
        torch.testing.assert_close(cpu_kernels.linear(x, w), torch.nn.functional.linear(x, w))


def test_per_head_norm_on_4d_input_keeps_its_shape(monkeypatch):
    """Qwen3 / OLMo2 normalise q and k per head: x [1, T, H, D], not two-dimensional."""
    x = torch.randn(1, 5, 4, 16, generator=torch.Generator().manual_seed(3)).transpose(1, 2)  # strided, 4-D
    _assert_close(*_both(monkeypatch, "rms_norm", "rms_norm", x, torch.randn(16), 1e-6, 0.0))
    gate_up = torch.randn(2, 3, 32)  # leading dims that are not [1, T]
    _assert_close(*_both(monkeypatch, "silu_mul", "silu_mul", gate_up))


@pytest.mark.parametrize("rows", [1, cpu_kernels.SMALL_LINEAR_ROWS])
def test_weight_only_int8_small_linear_matches_dequantized_torch(monkeypatch, rows):
    calls, real = [], cpu_kernels.small_linear
    monkeypatch.setattr(cpu_kernels, "small_linear", lambda *a: calls.append(a[1].dtype) or real(*a))
    gen = torch.Generator().manual_seed(rows)
    weight, scale = quant.quantize_int8(torch.randn(203, 96, generator=gen))
    bias, x = torch.randn(203, generator=gen), torch.randn(1, rows, 96, generator=gen)
    out = lowering.linear_int8(x, weight, scale, bias)
    expect = torch.nn.functional.linear(x, weight.float() * scale[:, None], bias)
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-4)
    assert calls == [torch.int8]  # the C loop ran over the int8 weights


@pytest.mark.parametrize("rows, with_extras", [(1, False), (5, True), (37, True)])
def test_w8a8_tile_kernel_equals_the_reference_bit_for_bit(rows, with_extras):
    gen = torch.Generator().manual_seed(rows)
    weight, scale = quant.quantize_int8(torch.randn(132, 192, generator=gen))
    packed = quant.pack_w8a8(weight)
    assert packed.shape == (33, 3, 4, 64) and torch.equal(quant.unpack_w8a8(packed), weight)
    x = torch.randn(1, rows, 192, generator=gen)
    bias = torch.randn(132, generator=gen) if with_extras else None
    input_scale = torch.rand(192, generator=gen) + 0.5 if with_extras else None
    expect = quant.linear_w8a8(x, weight, scale, input_scale, bias)  # torch._int_mm over the HF layout
    fast, unpacked = _both_w8a8(packed, x, scale, input_scale, bias)
    assert torch.equal(fast, expect) and torch.equal(unpacked, expect)


def _both_w8a8(packed, x, scale, input_scale, bias):
    calls, real = [], cpu_kernels.linear_w8a8_packed
    with pytest.MonkeyPatch.context() as m:
        m.setattr(cpu_kernels, "linear_w8a8_packed", lambda *a: calls.append(1) or real(*a))
        fast = lowering.linear_w8a8_packed(x, packed, scale, input_scale, bias)
        assert calls, "the C kernel did not run"
    return fast, quant.linear_w8a8_packed(x, packed, scale, input_scale, bias)


def test_float32_linear_above_the_c_rows_runs_onednn_and_follows_in_place_writes():
    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch built without oneDNN: torch's linear runs")
    gen = torch.Generator().manual_seed(7)
    weight, bias = torch.randn(96, 64, generator=gen), torch.randn(96, generator=gen)
    x = torch.randn(1, cpu_kernels.C_LINEAR_ROWS + 3, 64, generator=gen)
    out = cpu_kernels.linear(x, weight, bias)
    assert weight._kiln_onednn[1] is not None  # the blocked copy was made and kept
    torch.testing.assert_close(out, torch.nn.functional.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
    weight.mul_(2.0)  # a stale blocked copy would still give the old result
    torch.testing.assert_close(
        cpu_kernels.linear(x, weight, bias), torch.nn.functional.linear(x, weight, bias), rtol=1e-5, atol=1e-5
    )
    strided = torch.randn(64, cpu_kernels.C_LINEAR_ROWS + 3, generator=gen).t()  # not contiguous
    torch.testing.assert_close(cpu_kernels.linear(strided, weight), strided @ weight.t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 6, cpu_kernels.SMALL_LINEAR_ROWS + 1])
def test_int8_tile_kernel_matches_the_dequantized_linear(rows):
    gen = torch.Generator().manual_seed(rows)
    weight, scale = quant.quantize_int8(torch.randn(48, 70, generator=gen))
    packed = quant.pack_int8(weight)
    assert packed.shape == (3, 70, 16) and torch.equal(quant.unpack_int8(packed), weight)
    x, bias = torch.randn(1, rows, 70, generator=gen), torch.randn(48, generator=gen)
    calls, real = [], cpu_kernels.linear_int8_packed
    with pytest.MonkeyPatch.context() as m:
        m.setattr(cpu_kernels, "linear_int8_packed", lambda *a: calls.append(1) or real(*a))
        out = lowering.linear_int8_packed(x, packed, scale, bias)
    assert bool(calls) == (rows <= cpu_kernels.SMALL_LINEAR_ROWS)  # above: the reference over unpacked weights
    expect = torch.nn.functional.linear(x, weight.float() * scale[:, None], bias)
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("shape", [(1, 7), (5, 1024), (300, 4099)])  # 300 x 4099 crosses the threaded size
def test_argmax_rows_is_torch_argmax_ties_and_infinities_included(shape):
    x = torch.randn(*shape)
    x[0, shape[1] // 2 :] = x[0].max()  # a tie: the first index wins, as in torch
    x[-1] = float("-inf")  # a row with nothing allowed
    strided = torch.randn(shape[0], shape[1] + 3)[:, 1 : shape[1] + 1]  # row stride != cols
    for t in (x, strided):
        assert torch.equal(cpu_kernels.argmax_rows(t), t.argmax(-1))


@pytest.mark.skipif(not cpu_kernels._onednn_enabled(), reason="no oneDNN in this torch build")
def test_memory_stays_flat_as_row_counts_vary() -> None:
    """oneDNN keeps a primitive per input shape: a sweep over 495 row counts (as a server meets batches of every
    size) must stop growing memory once the padded shapes have all been seen (decode sizes up to
    ONEDNN_EXACT_ROWS keep their own, in the first half)."""

    def rss_mib() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    weights = [torch.randn(512, 512) for _ in range(2)]
    samples = []
    for rows in range(17, 512):
        x = torch.randn(rows, 512)
        for w in weights:
            cpu_kernels.linear(x, w)
        samples.append(rss_mib())
    torch.testing.assert_close(cpu_kernels.linear(x, weights[0]), x @ weights[0].T, atol=1e-4, rtol=1e-4)
    middle = samples[len(samples) // 2]
    assert samples[-1] - middle < 0.05 * middle, f"RSS grew {samples[-1] - middle:.1f} MiB in the second half"
