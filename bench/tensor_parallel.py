"""Decode step time of one model split over 1 and over N tensor-parallel ranks, in the same run.

A ~110M-parameter Llama with random weights (hidden 768, 12 layers, 12 heads / 4 KV heads of 64, vocab 32000,
intermediate 2048, the shape of bench/quantization.py). Each engine decodes a batch of sequences with `--context`
cached tokens, one packed step at a time; rounds alternate the engines so that load from other processes hits
both alike. Figures: median (min / max) milliseconds per decode step. On CPUs the ranks share the machine's cores
(TP=1 runs on all of them; with N ranks each takes cores/N threads), so this measures what splitting costs and
gains on one machine; on GPUs each rank has its own device.

    python -m kiln.bench.tensor_parallel [--tp 2] [--batch 1,16] [--rounds 5] [--steps 16] [--device cpu]
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
from kiln.bench.engine_overhead import cpu_model, load_avg
from kiln.bench.quantization import MODEL_SHAPE
from kiln.models.testing import build_tiny_checkpoint
from kiln.ops.metadata import AttentionMetadata

BLOCK = 16


class BatchDecoder:
    """`batch` sequences of `context` cached tokens, decoded one packed step at a time."""

    def __init__(self, model: kiln.CompiledModel, batch: int, context: int, steps: int) -> None:
        per_seq = -(-(context + steps + 2) // BLOCK)
        self.model, self.batch = model, batch
        self.tables = [[s * per_seq + b for b in range(per_seq)] for s in range(batch)]
        self.caches = model.allocate_kv_cache(batch * per_seq, BLOCK)
        gen = torch.Generator().manual_seed(0)
        prompt = torch.randint(4, model.vocab_size, (batch * context,), generator=gen)
        meta = AttentionMetadata.build([context] * batch, [0] * batch, self.tables, BLOCK, model.device)
        positions = torch.arange(context).repeat(batch)
        self.last = model(prompt.to(model.device), positions.to(model.device), meta, self.caches)
        self.length = context

    def step(self) -> float:
        ids = self.last.argmax(-1)
        meta = AttentionMetadata.build([1] * self.batch, [self.length] * self.batch, self.tables, BLOCK)
        positions = torch.full((self.batch,), self.length)
        if self.model.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        self.last = self.model(ids, positions.to(self.model.device), meta, self.caches)
        if self.model.device.type == "cuda":
            torch.cuda.synchronize()
        self.length += 1
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tp", type=int, default=2, help="ranks of the split engine (default 2)")
    parser.add_argument("--batch", default="1,16", help="decode batch sizes, comma-separated (default 1,16)")
    parser.add_argument("--context", type=int, default=128, help="cached tokens per sequence (default 128)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=16, help="decode steps per engine per round")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    print(
        f"machine: {cpu_model()}, {os.cpu_count()} CPUs, load {load_avg()}; python "
        f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}; "
        f"device {args.device}" + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else "")
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_checkpoint("llama", Path(tmp) / "llama-110m", with_tokenizer=False, **MODEL_SHAPE)
        threads = torch.get_num_threads()
        whole = kiln.compile(path, device=args.device)
        split = kiln.compile(path, device=args.device, tensor_parallel_size=args.tp)
        try:
            print(f"TP=1: {threads} threads; TP={args.tp}: {torch.get_num_threads()} threads per rank")
            print(next(line for line in split.report.format().splitlines() if line.startswith("tensor parallel")))
            for batch in batches:
                times: dict[str, list[float]] = {"TP=1": [], f"TP={args.tp}": []}
                for _ in range(args.rounds):
                    for name, model, n in (("TP=1", whole, threads), (f"TP={args.tp}", split, None)):
                        if n is not None:  # the whole model gets every core; the split one its share per rank
                            torch.set_num_threads(n)
                        else:
                            torch.set_num_threads(max(1, threads // args.tp))
                        decoder = BatchDecoder(model, batch, args.context, args.steps)
                        times[name] += [decoder.step() for _ in range(args.steps)]
                cells = []
                for name, samples in times.items():
                    ms = [t * 1e3 for t in samples]
                    cells.append(f"{name} {statistics.median(ms):.2f} ms ({min(ms):.2f} / {max(ms):.2f})")
                ratio = statistics.median(times["TP=1"]) / statistics.median(times[f"TP={args.tp}"])
                print(f"batch {batch:>3}, context {args.context}: " + "; ".join(cells) + f"; speedup {ratio:.2f}x")
        finally:
            split.shutdown()


if __name__ == "__main__":
    main()
