"""Host overhead of `LLMEngine.step()`: milliseconds per decode step with a model that costs nothing.

A zero-cost model (forward returns a slice of preallocated random logits) serves B greedy requests of 16-token
prompts that never finish during the run; after every sequence is decoding, N steps are timed one by one. The
sampler is wrapped in a timing proxy, so each step splits into the sampler's time (on a CPU that is the
"device-side" sampling work: argmax over [B, vocab]) and the host time outside it (scheduling, input packing,
output processing). Figures are min/median/max over the timed steps.

    python -m kiln.bench.engine_overhead --batch 64 256 --vocab 1024 128256 --steps 200 --large-vocab-steps 100
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from kiln.ops.metadata import AttentionMetadata
from kiln.runtime.engine import LLMEngine
from kiln.runtime.sampling_params import SamplingParams

PROMPT_LEN = 16
BLOCK_SIZE = 16
LARGE_VOCAB = 32_768  # vocabularies at least this big use --large-vocab-steps
RESULTS = Path(__file__).resolve().parent / "results" / "engine_overhead.txt"


class ZeroCostModel:
    """The CompiledModel serving interface, as the engine uses it, with a forward that does no work."""

    tokenizer = None
    eos_token_ids: list[int] = []
    device = torch.device("cpu")
    dtype = torch.float32
    backend = "reference"

    def __init__(self, vocab_size: int, max_num_seqs: int, max_model_len: int) -> None:
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.logits = torch.randn(max_num_seqs, vocab_size, generator=torch.Generator().manual_seed(0))

    def kv_cache_bytes_per_block(self, block_size: int) -> int:
        return 4

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> list[torch.Tensor]:
        return [torch.zeros(1)]

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, kv_caches: list[torch.Tensor]
    ) -> torch.Tensor:
        """Fixed logits [num_seqs, vocab]: a view, no copy."""
        return self.logits[: meta.logits_indices.numel()]

    __call__ = forward


class TimedSampler:
    """Forwards everything to the engine's sampler and adds the time spent in its calls to `seconds`."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.seconds = 0.0

    def timed(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.timed(self.inner, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        return (lambda *a, **k: self.timed(attr, *a, **k)) if callable(attr) else attr


def measure(
    batch: int, vocab: int, steps: int, warmup: int, stream: bool, engine_options: dict
) -> tuple[list[float], list[float]]:
    """Per timed decode step: (step seconds, seconds inside the sampler). stream: every request reported after
    every step (AsyncLLMEngine, the server); else only when finished (LLM.generate)."""
    max_tokens = warmup + steps + 8  # nobody finishes while we measure
    max_len = PROMPT_LEN + max_tokens
    model = ZeroCostModel(vocab, batch, max_len)
    engine = LLMEngine(
        model,
        max_num_seqs=batch,
        num_kv_blocks=batch * -(-max_len // BLOCK_SIZE),
        block_size=BLOCK_SIZE,
        max_num_batched_tokens=batch * PROMPT_LEN,
        **engine_options,
    )
    sampler = TimedSampler(engine.runner.sampler)
    engine.runner.sampler = sampler
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    requests = [
        engine.make_request(f"r{i}", [rng.randrange(vocab) for _ in range(PROMPT_LEN)], params, stream=stream)
        for i in range(batch)
    ]
    for request in requests:
        engine.enqueue(request)
    while any(r.seqs[0].num_output_tokens == 0 for r in requests):  # prefill until every request decodes
        engine.step()
        if engine.num_steps > 2 * batch:
            raise RuntimeError("requests did not all start decoding")
    for _ in range(warmup):
        engine.step()
    step_s, sampler_s = [], []
    for _ in range(steps):
        sampler.seconds = 0.0
        start = time.perf_counter()
        outputs = engine.step()
        step_s.append(time.perf_counter() - start)
        sampler_s.append(sampler.seconds)
        if len(outputs) != (batch if stream else 0) or any(out.finished for out in outputs):
            raise RuntimeError(f"a timed step returned {len(outputs)} outputs for {batch} decoding requests")
    return step_s, sampler_s


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def ms3(values: list[float]) -> str:
    """min / median / max in milliseconds."""
    return f"{min(values) * 1e3:7.3f} / {statistics.median(values) * 1e3:7.3f} / {max(values) * 1e3:7.3f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--vocab", type=int, nargs="+", default=[1024, 128_256])
    parser.add_argument("--steps", type=int, default=200, help=f"decode steps timed for vocab < {LARGE_VOCAB}")
    parser.add_argument(
        "--large-vocab-steps",
        type=int,
        default=100,
        help=f"decode steps timed for vocab >= {LARGE_VOCAB} (each step argmaxes [B, vocab])",
    )
    parser.add_argument("--warmup", type=int, default=10, help="untimed decode steps after every request decodes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared machine)")
    parser.add_argument(
        "--stream",
        action="store_true",
        help="report every request after every step (AsyncLLMEngine, the server); default: only "
        "finished ones (LLM.generate)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    engine_options: dict = {}
    lines = [
        f"$ python -m kiln.bench.engine_overhead {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip(),
        f"date: {datetime.now().isoformat(timespec='seconds')}",
        f"machine: {cpu_model()}, {os.cpu_count()} cores; python {platform.python_version()}, torch "
        f"{torch.__version__}, torch threads {torch.get_num_threads()}",
        f"load average (1/5/15 min) at start: {load_avg()}",
        f"workload: B greedy requests, {PROMPT_LEN}-token prompts, ignore_eos, block_size {BLOCK_SIZE}, zero-cost "
        f"model (logits are a view of fixed random values); {args.warmup} warm-up decode steps, then {args.steps} "
        f"timed steps for vocab < {LARGE_VOCAB}, {args.large_vocab_steps} for larger vocabularies; outputs "
        f"{'streamed every step' if args.stream else 'reported when finished (LLM.generate)'}",
        "ms per decode step, min / median / max; outside sampler = step - sampler, per step",
        "",
        f"| {'batch':>5} | {'vocab':>7} | {'steps':>5} | {'step ms min / med / max':>25} | {'sampler med':>11} "
        f"| {'outside sampler min / med / max':>31} |",
        f"|{'-' * 6}:|{'-' * 8}:|{'-' * 6}:|{'-' * 26}:|{'-' * 12}:|{'-' * 32}:|",
    ]
    print("\n".join(lines), flush=True)
    for vocab in args.vocab:
        steps = args.large_vocab_steps if vocab >= LARGE_VOCAB else args.steps
        for batch in args.batch:
            step_s, sampler_s = measure(batch, vocab, steps, args.warmup, args.stream, engine_options)
            outside = [s - t for s, t in zip(step_s, sampler_s)]
            row = (
                f"| {batch:5} | {vocab:7} | {steps:5} | {ms3(step_s):>25} | "
                f"{statistics.median(sampler_s) * 1e3:11.3f} | {ms3(outside):>31} |"
            )
            print(row, flush=True)
            lines.append(row)
    lines += ["", f"load average (1/5/15 min) at end: {load_avg()}"]
    print(lines[-1])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n")
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
