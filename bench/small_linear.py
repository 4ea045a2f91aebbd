"""The decode GEMMs of the 30M runtime-benchmark Llama at small batch: torch's `linear` against kiln's C loop.

Backend "reference" sends float32 linears of up to `cpu_kernels.C_LINEAR_ROWS` rows to the C loop (oneDNN
takes larger ones); this prints where the C loop beats torch's `linear`. Eight layers' worth of distinct
weights per repetition, so they stream from memory as in a decode step; median of alternating repetitions.

    python -m kiln.bench.small_linear --threads 1

Prints the C kernels' instruction-set path (AVX-512 VNNI / AVX2 / scalar) with every row; `KILN_CPU_ISA=avx2`
(or `scalar`) forces a lower one.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from kiln.backends.cpu import build as cpu_build
from kiln.backends.cpu import kernels as cpu_kernels

SHAPES = [(1024, 512), (2816, 512), (512, 1408), (512, 512)]  # fused qkv, fused gate/up, down, o: [out, in]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if cpu_kernels._library() is None:
        raise SystemExit("the C kernels could not be built on this machine (no C compiler or Python headers)")
    level = cpu_kernels.isa()
    assert level is not None
    print(f"{platform.machine()}, torch {torch.__version__}, {args.threads} thread(s); ms for 8 layers' GEMMs")
    print(f"CPU: {cpu_build.cpu_description()}; C kernels: {cpu_build.ISA_NAMES[level]}\n")
    layers = [[torch.randn(*shape) for shape in SHAPES] for _ in range(8)]
    print(
        "| rows | torch linear | kiln C loop | speedup | path |\n|-----:|-------------:|------------:|--------:|:---|"
    )
    for rows in args.rows:
        inputs = {k: torch.randn(rows, k) for k in {shape[1] for shape in SHAPES}}

        def small(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return cpu_kernels.small_linear(x, w, None, None)

        times: dict[str, list[float]] = {"torch": [], "kiln": []}
        with torch.inference_mode():
            for rep in range(args.repeats):
                for name, fn in list({"torch": F.linear, "kiln": small}.items())[:: 1 if rep % 2 else -1]:
                    start = time.perf_counter()
                    for layer in layers:
                        for w in layer:
                            fn(inputs[w.shape[1]], w)
                    times[name].append(time.perf_counter() - start)
        t, k = (statistics.median(times[n]) * 1e3 for n in ("torch", "kiln"))
        print(f"| {rows:4} | {t:12.2f} | {k:11.2f} | {t / k:6.2f}x | {level} |")


if __name__ == "__main__":
    main()
