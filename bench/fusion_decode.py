"""Decode-step time on the reference backend, with and without the fusion passes, in the same run.

A ~30M-parameter random Llama (hidden 512, 8 layers, 8 heads / 4 KV heads, vocab 8192, intermediate 1408);
a batch of S sequences each at context C decodes one token per step. The two engines alternate step by step
(in alternating order) so that bursts of load from other processes hit both alike; the figure is the median
step time.

    python -m kiln.bench.fusion_decode --batch 32 --context 128 --steps 100 --threads 1
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
from kiln.compiler.metadata import AttentionMetadata
from kiln.models.testing import build_tiny_checkpoint
from kiln.passes.base import layer_op_counts
from kiln.passes.pipeline import PASS_FLAGS

MODEL_SHAPE = dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=1024,
                   initializer_range=0.05)
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


def step_time(compiled: kiln.CompiledModel, inputs: tuple) -> float:
    start = time.perf_counter()
    compiled(*inputs)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=100, help="decode steps timed per engine")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.machine()} {platform.processor() or platform.platform()}, {os.cpu_count()} CPUs, "
          f"torch threads {torch.get_num_threads()}; python {platform.python_version()}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_checkpoint("llama", Path(tmp) / "llama-30m", with_tokenizer=False, **MODEL_SHAPE)
        engines = {"fused": kiln.compile(path), "unfused": kiln.compile(path, **NO_FUSION)}
    params = sum(p.numel() for p in engines["fused"].graph_module.parameters())
    print(f"model: Llama {params / 1e6:.1f}M params; decode batch {args.batch} at context {args.context}, "
          f"{args.steps} steps per engine")
    inputs = {name: decode_inputs(e, args.batch, args.context) for name, e in engines.items()}
    times: dict[str, list[float]] = {name: [] for name in engines}
    with torch.inference_mode():
        for name, e in engines.items():  # warm-up
            for _ in range(3):
                step_time(e, inputs[name])
        for step in range(args.steps):
            for name in list(engines)[:: 1 if step % 2 else -1]:
                times[name].append(step_time(engines[name], inputs[name]))
    for name, e in engines.items():
        ops = layer_op_counts(e.graph_module, e.num_layers)
        print(f"{name:>8}: median decode step {statistics.median(times[name]) * 1e3:7.2f} ms "
              f"(p10 {sorted(times[name])[len(times[name]) // 10] * 1e3:.2f} ms), ops per layer {max(ops)}")
    speedup = statistics.median(times["unfused"]) / statistics.median(times["fused"])
    print(f"fusion speedup: {speedup:.2f}x")


if __name__ == "__main__":
    main()
