"""Each C kernel at each instruction-set level this CPU runs (backends/cpu/build.py), at decode sizes of the 110M
Llama of bench/quantization.py: microseconds per call, the levels interleaved within every repetition so the
same load hits them all. The float kernels should not depend on the level much; the GEMVs show what the
hand-written int8 paths buy (12 layers' worth of distinct weights per repetition, so they stream from memory).

    python -m kiln.bench.cpu_isa --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from kiln.backends.cpu import build
from kiln.backends.cpu import kernels as cpu_kernels
from kiln.ops import quant

SHAPES = [(1280, 768), (4096, 768), (768, 2048), (768, 768)]  # fused qkv, fused gate/up, down, o: [out, in]


def kernels(rows: int) -> dict[str, tuple[Callable[[], object], int]]:
    """name -> (one call, calls per timing) over fixed inputs."""
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, dim, block, ctx = 12, 4, 64, 16, 512
    q = torch.randn(rows, heads, dim, generator=gen)
    k_cache = torch.randn(rows * ctx // block, block, kv_heads, dim, generator=gen)
    v_cache = torch.randn(rows * ctx // block, block, kv_heads, dim, generator=gen)
    tables, lens = torch.arange(rows * ctx // block).view(rows, -1), torch.full((rows,), ctx)
    x, res, w = torch.randn(rows, 768, generator=gen), torch.randn(rows, 768, generator=gen), torch.randn(768)
    gate_up, qr = torch.randn(rows, 4096, generator=gen), torch.randn(rows, heads, dim, generator=gen)
    cos_sin, pos = torch.randn(1024, dim, generator=gen), torch.randint(0, 1024, (rows,), generator=gen)
    logits = torch.randn(rows, 32000, generator=gen)
    layers = []
    for _ in range(12):
        for n, k in SHAPES:
            weight = torch.randn(n, k, generator=gen)
            qw, scale = quant.quantize_int8(weight)
            layers.append((weight, quant.pack_int8(qw), quant.pack_w8a8(qw), scale, torch.randn(rows, k)))

    def gemvs(kind: str) -> None:
        for weight, p_int8, p_w8a8, scale, xk in layers:
            if kind == "fp32":
                cpu_kernels.small_linear(xk, weight, None, None)
            elif kind == "int8":
                cpu_kernels.linear_int8_packed(xk, p_int8, scale, None)
            else:
                cpu_kernels.linear_w8a8_packed(xk, p_w8a8, scale, None, None)

    return {
        "decode attention (ctx 512)": (
            lambda: cpu_kernels.paged_decode(q, k_cache, v_cache, tables, lens, 0.125, 0, 0.0),
            20,
        ),
        "add + RMSNorm (768)": (lambda: cpu_kernels.rms_norm(x, res, w, 1e-6, 0.0), 500),
        "gated SiLU (2048)": (lambda: cpu_kernels.silu_mul(gate_up), 500),
        "rope (12 x 64)": (lambda: cpu_kernels.rope(qr, pos, cos_sin, dim, True), 500),
        "argmax (32000)": (lambda: cpu_kernels.argmax_rows(logits), 100),
        "12 layers' GEMVs fp32": (lambda: gemvs("fp32"), 1),
        "12 layers' GEMVs int8": (lambda: gemvs("int8"), 1),
        "12 layers' GEMVs w8a8": (lambda: gemvs("w8a8"), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, default=1, help="decode batch (rows of x, sequences)")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if cpu_kernels._library() is None:
        raise SystemExit("the C kernels could not be built on this machine (no C compiler or Python headers)")
    levels = build.supported_levels()
    print(f"CPU: {build.cpu_description()}; {args.threads} thread(s), {args.rows} row(s)")
    print(f"levels: {', '.join(build.ISA_NAMES[lv] for lv in levels)}; microseconds per call, median\n")
    calls = kernels(args.rows)
    times: dict[tuple[str, str], list[float]] = {(name, lv): [] for name in calls for lv in levels}
    with torch.inference_mode():
        for rep in range(args.repeats):
            for lv in levels[:: 1 if rep % 2 else -1]:
                with cpu_kernels.at_level(lv):
                    for name, (fn, count) in calls.items():
                        start = time.perf_counter()
                        for _ in range(count):
                            fn()
                        times[name, lv].append((time.perf_counter() - start) / count * 1e6)
    print("| kernel | " + " | ".join(levels) + " |\n|---|" + "---:|" * len(levels))
    for name in calls:
        cells = " | ".join(f"{statistics.median(times[name, lv]):.1f}" for lv in levels)
        print(f"| {name} | {cells} |")


if __name__ == "__main__":
    main()
