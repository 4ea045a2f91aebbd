"""Grammar overhead: milliseconds per decode step with and without a JSON schema, at batch 1 and 32, same run.

A random Llama (the demo shape by default: hidden 256, 4 layers, vocab given by --vocab, with the test
tokenizer trained on the spot) serves B requests that never finish during the run (ignore_eos; the schema is
an array of at least 10,000 objects, so the grammar never completes): after every sequence is decoding,
--steps steps are timed one by one. "json" rows put every request under the schema; the token masks are
filled by llguidance on its own threads while the forward runs, then applied to the logits in one batched op.
The ratio is json / plain median step time at the same batch.

    python -m kiln.bench.structured_output --batch 1 32 --steps 60
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import torch

from kiln.runtime.engine import LLMEngine
from kiln.runtime.sampling_params import SamplingParams

RESULTS = Path(__file__).resolve().parent / "results" / "structured_output.txt"
WARMUP = 8
SCHEMA = {
    "type": "array",
    "minItems": 10_000,
    "items": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "count": {"type": "integer", "minimum": 0, "maximum": 100_000},
            "kind": {"enum": ["clay", "glaze", "fire"]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        },
        "required": ["name", "count", "kind"],
    },
}


def build_model(vocab: int, device: str):
    """A compiled random Llama of the demo shape with a `vocab`-entry tokenizer."""
    import kiln
    from kiln.models.testing import DEMO_ARCH, DEMO_OVERRIDES, build_tiny_checkpoint

    path = build_tiny_checkpoint(
        DEMO_ARCH, tempfile.mkdtemp(prefix="kiln-so-bench-"), **{**DEMO_OVERRIDES, "vocab_size": vocab}
    )
    return kiln.compile(str(path), device=device)


def time_steps(model, batch: int, constrained: bool, steps: int) -> list[float]:
    """Per-step seconds of `steps` decode steps after warm-up, all `batch` requests decoding."""
    engine = LLMEngine(model, num_kv_blocks=batch * 8 + 8, block_size=16, max_num_seqs=max(batch, 1))
    params = SamplingParams(
        max_tokens=WARMUP + steps + 4,
        temperature=0.0,
        ignore_eos=True,
        structured_output={"json": SCHEMA} if constrained else None,
    )
    for i in range(batch):
        engine.add_request(f"r{i}", f"Inventory {i}:", params)
    for _ in range(WARMUP):
        engine.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    engine.abort([f"r{i}" for i in range(batch)])
    return times


def main(argv: list[str] | None = None) -> None:
    import llguidance

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args.vocab, args.device)
    lines = [
        "$ python -m kiln.bench.structured_output " + " ".join(sys.argv[1:] if argv is None else argv),
        f"date: {datetime.now().isoformat(timespec='seconds')}",
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, device {model.device}; "
        f"python {platform.python_version()}, torch {torch.__version__}, llguidance {llguidance.__version__}, "
        f"torch threads {torch.get_num_threads()}",
        f"load average (1/5/15 min) at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"model: random Llama, hidden 256, 4 layers, vocab {args.vocab}; greedy, ignore_eos; {WARMUP} warm-up "
        f"steps, then {args.steps} timed decode steps",
        "",
        "| batch | plain step ms min / med | json step ms min / med | json / plain (median) |",
        "|------:|------------------------:|-----------------------:|----------------------:|",
    ]
    for batch in args.batch:
        plain = time_steps(model, batch, False, args.steps)
        constrained = time_steps(model, batch, True, args.steps)
        p, c = statistics.median(plain), statistics.median(constrained)
        lines.append(
            f"| {batch:5d} | {min(plain) * 1e3:9.3f} / {p * 1e3:9.3f} | {min(constrained) * 1e3:8.3f} / "
            f"{c * 1e3:9.3f} | {c / p:21.3f} |"
        )
    lines.append(f"\nload average (1/5/15 min) at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    text = "\n".join(lines)
    print(text)
    if not args.no_save:
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(text + "\n")


if __name__ == "__main__":
    main()
