"""The CPU kernels at every instruction-set level this machine runs (backends/cpu/build.py): each level's library
is the one built for it and matches the ops' torch references; w8a8 is bit for bit the same on every level and
int8 within float rounding; KILN_CPU_ISA forces a level and refuses one the CPU lacks; and a compiled model runs
on the forced portable level (the path a CPU without AVX2 takes)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_reference import run_prefill_then_decode

import kiln
from kiln.backends.cpu import build, lowering
from kiln.backends.cpu import kernels as cpu_kernels
from kiln.compiler.export import artifact
from kiln.ops import fused, quant

pytestmark = pytest.mark.skipif(cpu_kernels._library() is None, reason="no C compiler: the torch references run")
LEVELS = build.supported_levels()
X86 = platform.machine().lower() in ("x86_64", "amd64")


@pytest.fixture(params=LEVELS)
def level(request):
    """Runs the test with kernels.py calling the library of one level."""
    with cpu_kernels.at_level(request.param):
        assert cpu_kernels.isa() == request.param  # the compiler targeted exactly this level
        yield request.param


def _close(a, b, tol=2e-6):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_float_kernels_match_the_references(level):
    gen = torch.Generator().manual_seed(1)
    x, res, w = torch.randn(3, 200, generator=gen), torch.randn(3, 200, generator=gen), torch.randn(200, generator=gen)
    for a, b in zip(lowering.add_rms_norm(x, res, w, 1e-6, 1.0), fused.add_rms_norm(x, res, w, 1e-6, 1.0)):
        _close(a, b)
    gate_up = torch.randn(4, 2 * 300, generator=gen) * 8
    _close(lowering.silu_mul(gate_up), fused.silu_mul(gate_up))
    q, k = torch.randn(5, 4, 64, generator=gen), torch.randn(5, 2, 64, generator=gen)
    cache, positions = torch.randn(40, 64, generator=gen), torch.tensor([0, 3, 39, 7, 7])
    for neox in (True, False):
        for a, b in zip(lowering.rope(q, k, positions, cache, 64, neox), fused.rope(q, k, positions, cache, 64, neox)):
            _close(a, b)
    weight, bias = torch.randn(203, 96, generator=gen), torch.randn(203, generator=gen)
    xs = torch.randn(3, 96, generator=gen)
    _close(cpu_kernels.small_linear(xs, weight, None, bias), torch.nn.functional.linear(xs, weight, bias), 1e-5)
    logits = torch.randn(3, 1000, generator=gen)
    assert torch.equal(cpu_kernels.argmax_rows(logits), logits.argmax(-1))


@pytest.mark.parametrize("softcap", [0.0, 5.0])
@pytest.mark.parametrize(
    "heads,kv_heads,dim,window",
    # head_dim 64: the vector paths only; 20: the portable ones only (not a multiple of 8); 136: two 64-wide
    # output slices, an 8-wide one, and a window that starts mid-block with a tail after the 8-token groups.
    [(8, 2, 64, 0), (6, 2, 20, 0), (4, 4, 136, 21)],
)
def test_decode_attention_matches_a_naive_softmax(level, softcap, heads, kv_heads, dim, window):
    gen = torch.Generator().manual_seed(2)
    block, lens = 16, [37, 1, 70]
    tables = torch.tensor([[1 + s + 3 * b for b in range(5)] for s in range(3)], dtype=torch.int32)
    k_cache, v_cache = torch.randn(16, block, kv_heads, dim, generator=gen), torch.randn(16, block, kv_heads, dim)
    q = torch.randn(3, heads, dim, generator=gen)
    out = cpu_kernels.paged_decode(q, k_cache, v_cache, tables, torch.tensor(lens), 0.125, window, softcap)
    for s, n in enumerate(lens):
        slots = (tables[s].long()[:, None] * block + torch.arange(block)).flatten()[:n]
        slots = slots[-window:] if window else slots
        keys = k_cache.flatten(0, 1)[slots].repeat_interleave(heads // kv_heads, 1)
        values = v_cache.flatten(0, 1)[slots].repeat_interleave(heads // kv_heads, 1)
        scores = torch.einsum("hd,khd->hk", q[s], keys) * 0.125
        scores = torch.tanh(scores / softcap) * softcap if softcap else scores
        _close(out[s], torch.einsum("hk,khd->hd", scores.softmax(-1), values), 1e-5)


def test_decode_attention_splits_kv_heads_over_threads_without_changing_a_bit(level, monkeypatch) -> None:
    """Fewer sequences than threads: each sequence's KV heads are shared out (up to one part per thread, at most
    one per head). A head's arithmetic is the same whichever task runs it, so outputs equal the one-thread ones."""
    gen = torch.Generator().manual_seed(6)
    heads, kv_heads, dim, block = 12, 4, 64, 16
    k_cache, v_cache = torch.randn(12, block, kv_heads, dim, generator=gen), torch.randn(12, block, kv_heads, dim)
    tables = torch.tensor([[3, 1, 7, 5], [2, 8, 4, 6]], dtype=torch.int32)
    q, lens = torch.randn(2, heads, dim, generator=gen), torch.tensor([50, 61])
    runs = []
    for threads in (1, 2, 3, 8):  # parts per sequence: 1, 2, 3, 4 with one sequence; 1, 1, 2, 4 with two
        monkeypatch.setattr(torch, "get_num_threads", lambda threads=threads: threads)
        for seqs in (1, 2):
            runs.append(cpu_kernels.paged_decode(q[:seqs], k_cache, v_cache, tables[:seqs], lens[:seqs], 0.125, 0, 0.0))
    assert all(torch.equal(run[0], runs[0][0]) for run in runs) and all(torch.equal(r, runs[1]) for r in runs[1::2])


def _w8a8_cases():
    gen = torch.Generator().manual_seed(3)
    for rows in (1, 2, 3, 5, 37):  # remainders of both the 2-row (AVX2) and 4-row (VNNI, portable) passes
        weight, scale = quant.quantize_int8(torch.randn(132, 192, generator=gen))
        x = torch.randn(1, rows, 192, generator=gen)
        yield x, weight, scale, torch.rand(192, generator=gen) + 0.5, torch.randn(132, generator=gen)
    # The worst case for AVX2's 16-bit pair sums: every product 127 * 127 with one sign (2 * 16129 per pair).
    sign = torch.where(torch.rand(192, generator=gen) < 0.5, -1.0, 1.0)
    weight = (sign * 127).to(torch.int8).repeat(8, 1)
    weight[4:] = -weight[4:]
    yield sign.repeat(4, 1) * 3.0, weight, torch.full((8,), 0.01), None, None


def test_w8a8_is_bit_identical_on_every_level() -> None:
    for x, weight, scale, input_scale, bias in _w8a8_cases():
        expect = quant.linear_w8a8(x, weight, scale, input_scale, bias)  # torch._int_mm over the HF layout
        packed = quant.pack_w8a8(weight)
        for lv in LEVELS:
            with cpu_kernels.at_level(lv):
                out = cpu_kernels.linear_w8a8_packed(x, packed, scale, input_scale, bias)
            assert torch.equal(out, expect), f"w8a8 at level {lv} is not the reference bit for bit"


def test_int8_agrees_across_levels_within_float_rounding() -> None:
    gen = torch.Generator().manual_seed(4)
    weight, scale = quant.quantize_int8(torch.randn(48, 1030, generator=gen))
    packed, bias = quant.pack_int8(weight), torch.randn(48, generator=gen)
    for rows in (1, 2, 3, 4, 7):
        x = torch.randn(rows, 1030, generator=gen)
        expect = torch.nn.functional.linear(x, weight.float() * scale[:, None], bias)
        outs = []
        for lv in LEVELS:
            with cpu_kernels.at_level(lv):
                outs.append(cpu_kernels.linear_int8_packed(x, packed, scale, bias))
        for lv, out in zip(LEVELS, outs):
            torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-4, msg=f"int8 at level {lv}")
            torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=1e-4, msg=f"int8 at {lv} vs {LEVELS[0]}")


def test_int8_kernels_split_output_tiles_over_torch_threads(level, monkeypatch) -> None:
    """256 x 1024 weights pass the threaded size: each output tile is one thread's, so results do not depend on
    the thread count, bit for bit (the kernels take torch.get_num_threads())."""
    gen = torch.Generator().manual_seed(5)
    weight, scale = quant.quantize_int8(torch.randn(256, 1024, generator=gen))
    x = torch.randn(3, 1024, generator=gen)
    runs = []
    for threads in (1, 2):
        monkeypatch.setattr(torch, "get_num_threads", lambda threads=threads: threads)
        runs.append(
            (
                cpu_kernels.linear_int8_packed(x, quant.pack_int8(weight), scale, None),
                cpu_kernels.linear_w8a8_packed(x, quant.pack_w8a8(weight), scale, None, None),
            )
        )
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert torch.equal(runs[1][1], quant.linear_w8a8(x, weight, scale, None, None))


@pytest.mark.skipif(not X86, reason="one level off x86")
def test_levels_and_the_forcing_variable(monkeypatch) -> None:
    assert LEVELS[-1] == "scalar" and LEVELS == [lv for lv in build.ISA_LEVELS if lv in LEVELS]  # best first
    monkeypatch.delenv("KILN_CPU_ISA", raising=False)
    assert build.selected_level() == LEVELS[0]
    monkeypatch.setenv("KILN_CPU_ISA", "scalar")
    assert build.selected_level() == "scalar"
    monkeypatch.setenv("KILN_CPU_ISA", "avx9")
    with pytest.raises(ValueError, match="KILN_CPU_ISA='avx9' is not a level"):
        build.selected_level()
    monkeypatch.setattr(build, "supported_levels", lambda: ["avx2", "scalar"])  # a CPU without AVX-512
    monkeypatch.setenv("KILN_CPU_ISA", "avx512_vnni")
    with pytest.raises(ValueError, match="this CPU lacks its instructions"):
        build.selected_level()
    with pytest.raises(ValueError, match="this CPU runs"), cpu_kernels.at_level("avx512_vnni"):
        pass


_CHILD = """
import json, sys, torch, kiln
from hf_reference import run_prefill_then_decode
from kiln.backends.cpu import kernels
art, out, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
logits = run_prefill_then_decode(kiln.load(art), prompts, 3)[1]
torch.save({"isa": kernels.isa(), "logits": torch.cat(logits)}, out)
"""


@pytest.mark.skipif(not X86, reason="one level off x86")
def test_a_compiled_model_runs_on_the_forced_portable_level(checkpoint, tmp_path: Path) -> None:
    """A w8a8 artifact (every C kernel a decode step calls: norms, rope, attention, w8a8, the fp32 head) in a
    process forced to the portable level, against the same artifact at this CPU's best level."""
    compiled, prompts = kiln.compile(checkpoint("llama"), quantization="w8a8"), [[5, 6, 7, 8, 9, 10, 11], [12, 13]]
    art, out = artifact.save(compiled, tmp_path / "w8a8"), tmp_path / "scalar.pt"
    env = {**os.environ, "KILN_CPU_ISA": "scalar", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, str(art), str(out), json.dumps(prompts)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0, child.stderr
    scalar = torch.load(out)
    assert scalar["isa"] == "scalar"
    # Float rounding differs between levels (sums in other orders), so a quantized activation may round the
    # other way: close, not equal (the w8a8 kernel itself is bit-identical, tested above).
    here = torch.cat(run_prefill_then_decode(compiled, prompts, 3)[1])
    torch.testing.assert_close(scalar["logits"], here, rtol=5e-3, atol=5e-3)
    bad = subprocess.run(
        [sys.executable, "-c", "from kiln.backends.cpu import kernels; kernels.isa()"],
        env={**env, "KILN_CPU_ISA": "avx9"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0 and "KILN_CPU_ISA='avx9' is not a level" in bad.stderr
