"""Decode-step time on the reference backend, with and without the fusion passes, in the same run.

A ~30M-parameter random Llama (hidden 512, 8 layers, 8 heads / 4 KV heads, vocab 8192, intermediate 1408);
batches of S sequences, each at context C, decode one token per step. The two engines alternate step by step
(in alternating order) so that bursts of load from other processes hit both alike. Figures are medians of the
wall time and of the CPU time of the stepping thread (with --threads 1 all work runs on it, so CPU time is
not inflated by other processes taking the core).

    python -m kiln.bench.fusion_decode --batch 1 8 32 --context 128 --steps 200 --threads 1
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers

import kiln
from kiln.compiler.pipeline import PASS_FLAGS
from kiln.models.testing import build_tiny_checkpoint
from kiln.ops.metadata import AttentionMetadata
from kiln.passes.base import layer_op_counts

MODEL_SHAPE = dict(
    vocab_size=8192,
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=64,
    max_position_embeddings=1024,
    initializer_range=0.05,
)
NO_FUSION = {flag: False for flag in PASS_FLAGS if flag.startswith("fuse_")}
BLOCK_SIZE = 16


def decode_inputs(compiled: kiln.CompiledModel, batch: int, context: int) -> tuple:
    """One decode step of `batch` sequences that each have `context` tokens cached (cache contents random)."""
    per_seq = context // BLOCK_SIZE + 1
    tables = [[s * per_seq + b for b in range(per_seq)] for s in range(batch)]
    meta = AttentionMetadata.build([1] * batch, [context] * batch, tables, BLOCK_SIZE)
    caches = [torch.randn_like(c) for c in compiled.allocate_kv_cache(batch * per_seq, BLOCK_SIZE)]
    ids = torch.randint(3, compiled.vocab_size, (batch,), generator=torch.Generator().manual_seed(0))
    return ids, torch.full((batch,), context), meta, caches


def step_time(compiled: kiln.CompiledModel, inputs: tuple) -> tuple[float, float]:
    """(wall seconds, this thread's CPU seconds) of one decode step."""
    wall, cpu = time.perf_counter(), time.thread_time()
    compiled(*inputs)
    return time.perf_counter() - wall, time.thread_time() - cpu


def compare(engines: dict[str, kiln.CompiledModel], batch: int, context: int, steps: int) -> None:
    inputs = {name: decode_inputs(e, batch, context) for name, e in engines.items()}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in engines}
    with torch.inference_mode():
        for name, e in engines.items():  # warm-up
            for _ in range(3):
                step_time(e, inputs[name])
        for step in range(steps):
            for name in list(engines)[:: 1 if step % 2 else -1]:
                times[name].append(step_time(engines[name], inputs[name]))
    medians = {name: [statistics.median(t[i] for t in ts) * 1e3 for i in (0, 1)] for name, ts in times.items()}
    (fw, fc), (uw, uc) = medians["fused"], medians["unfused"]
    print(
        f"| {batch:5} | {context:7} | {fw:10.2f} | {uw:12.2f} | {uw / fw:7.2f}x | {fc:9.2f} | {uc:11.2f} | "
        f"{uc / fc:7.2f}x |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=200, help="decode steps timed per engine and batch")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"machine: {platform.machine()} {platform.processor() or platform.platform()}, {os.cpu_count()} CPUs, "
        f"torch threads {torch.get_num_threads()}; python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_checkpoint("llama", Path(tmp) / "llama-30m", with_tokenizer=False, **MODEL_SHAPE)
        engines = {"fused": kiln.compile(path), "unfused": kiln.compile(path, **NO_FUSION)}
    params = sum(p.numel() for p in engines["fused"].graph_module.parameters())
    ops = {name: max(layer_op_counts(e.graph_module, e.num_layers)) for name, e in engines.items()}
    print(
        f"model: Llama {params / 1e6:.1f}M params; ops per decoder layer: fused {ops['fused']}, unfused "
        f"{ops['unfused']}; {args.steps} steps per engine and batch; median ms per decode step\n"
    )
    print("| batch | context | fused wall | unfused wall | speedup | fused CPU | unfused CPU | speedup |")
    print("|------:|--------:|-----------:|-------------:|--------:|----------:|------------:|--------:|")
    for batch in args.batch:
        compare(engines, batch, args.context, args.steps)


if __name__ == "__main__":
    main()
