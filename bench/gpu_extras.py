"""bench/gpu.py's "extras" phase: what only a GPU can answer for the newer features, each a peer of its own.

profile: `kiln profile` of the benchmark checkpoint (decode at batch 1 and 64 with 2,048 cached tokens, prefill of
512 tokens): per op its time and fraction of the measured copy bandwidth / matmul rate. cold_start: fresh processes
from an artifact with and without sm_<this GPU> cubins (bench/cold_start.py), with the Triton compilations each
made. tensor_parallel: TP=1 vs TP=2 decode step time (bench/tensor_parallel.py); it needs two GPUs, and is
recorded as skipped on one.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import torch

from .gpu_common import Recorder, peer
from .gpu_engine import checkpoint


def _profile(args: argparse.Namespace, rec: Recorder) -> None:
    import kiln
    from kiln.runtime import profile as prof

    compiled = kiln.compile(str(checkpoint(args)), device=args.device)
    ceilings = prof.measure_ceilings(compiled.device, compiled.dtype)
    rec.figure(
        "profile_ceilings", device=ceilings.device, copy_gbs=ceilings.bandwidth / 1e9, tflops=ceilings.flops / 1e12
    )
    context = 64 if args.tiny else 2048
    for phase, batch, new, ctx in (("decode", 1, 1, context), ("decode", 64, 1, context), ("prefill", 1, 512, 0)):
        step = prof.profile_step(compiled, phase, 2 if args.tiny else batch, 8 if args.tiny and new > 1 else new, ctx)
        rows = [
            {
                "op": r.name,
                "calls": r.calls,
                "ms": r.seconds * 1e3,
                "pct_bw": 100 * r.bytes / r.seconds / ceilings.bandwidth,
            }
            for r in step.rows[:8]
            if r.seconds
        ]
        rec.figure(f"profile_{phase}_b{batch}", step_ms=step.step_seconds * 1e3, shape=step.shape, ops=rows)
        print(prof.format_table(step, ceilings), flush=True)


def _run_lines(rec: Recorder, name: str, argv: list[str]) -> None:
    """A bench script as a subprocess (fresh processes are what it measures); its output lines are the figure."""
    done = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, check=True)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    print("\n".join(lines), flush=True)
    rec.figure(name, lines=lines)


def extras(args: argparse.Namespace, rec: Recorder) -> None:
    peer(args, rec, "profile", lambda: _profile(args, rec))
    model = str(checkpoint(args))
    peer(
        args,
        rec,
        "cold_start",
        lambda: _run_lines(rec, "cold_start", ["kiln.bench.cold_start", model, "--repeats", "1"]),
    )
    gpus = torch.cuda.device_count()
    if args.tiny or (args.device != "cpu" and gpus < 2):
        reason = "--tiny (its 110M model is the bench's own)" if args.tiny else f"{gpus} GPU: TP=2 needs two"
        rec.status("tensor_parallel", "skipped", 0.0, reason=reason)
        return
    device = "cpu" if args.device == "cpu" else "cuda"
    argv = ["kiln.bench.tensor_parallel", "--device", device, "--rounds", "2", "--steps", "8"]
    peer(args, rec, "tensor_parallel", lambda: _run_lines(rec, "tensor_parallel", argv))
