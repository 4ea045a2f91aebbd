"""Quantized engines against fp32 on the reference backend (CPU), HF fp32 in the same run.

A ~110M-parameter Llama (hidden 768, 12 layers, 12 heads / 4 KV heads of 64, vocab 32000, intermediate 2048):
by default trained for a few minutes on a toy language first (bench/toy_language.py: random weights are too
unsure of their argmax for agreement to mean anything), or `--weights random`. Per engine: weight memory (every
tensor the forward holds), batch-1 decode tokens/s (median step over rounds that alternate the engines, so
bursts of load from other processes hit all alike), teacher-forced top-1 agreement with HF fp32 over 64 tokens
(the prompt plus HF's greedy continuation, one packed prefill), the mean absolute logit error there, greedy
agreement (tokens equal to HF's free-running greedy output), and KV blocks in a fixed memory budget. HF's own
top-1 margins are printed beside them: agreement measures how far a mode's error reaches past them.

    python -m kiln.bench.quantization --threads 1 --rounds 3 --steps 16 [--weights random]

The C kernels' instruction-set path (AVX-512 VNNI / AVX2 / scalar, backends/cpu/build.py) is printed with every
figure; `KILN_CPU_ISA=avx2` (or `scalar`) forces a lower one, and `--isa avx512_vnni,avx2` times several in one
run (their steps interleaved within each round, so the same load hits them all).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers

import kiln
from kiln.backends.cpu import build as cpu_build
from kiln.backends.cpu import kernels as cpu_kernels
from kiln.bench import toy_language
from kiln.models.testing import build_tiny_checkpoint
from kiln.ops.metadata import AttentionMetadata

# initializer_range 0.02 is HF's default; at the 0.1 of kiln's test checkpoints a 12-layer random model is
# chaotic (1% weight noise flips half of its argmaxes), which says nothing about a quantizer.
MODEL_SHAPE = dict(
    vocab_size=32000,
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=4,
    head_dim=64,
    max_position_embeddings=1024,
    initializer_range=0.02,
)
ENGINES = {  # name -> (quantization, kv_cache_dtype)
    "fp32": (None, None),
    "int8": ("int8", None),
    "w8a8": ("w8a8", None),
    "w8a8:smooth": ("w8a8:smooth", None),
    "int8:head": ("int8:head", None),
    "w8a8:head": ("w8a8:head", None),
    "int4": ("int4", None),
    "int4:zp": ("int4:zp", None),
    "int4:awq": ("int4:awq", None),
    "fp32+kv int8": (None, "int8"),
    "fp32+kv fp8": (None, "fp8_e4m3"),
    "w8a8+kv int8": ("w8a8", "int8"),
}
BLOCK, TOKENS, PROMPT = 16, 64, 8


def weight_bytes(compiled: kiln.CompiledModel) -> int:
    gm = compiled.graph_module
    seen = {t.data_ptr(): t.nbytes for t in [*gm.parameters(), *gm.buffers()]}
    return sum(seen.values())


def hf_greedy(model: torch.nn.Module, prompt: list[int], steps: int) -> tuple[list[int], float]:
    """HF's greedy continuation and its median decode step time."""
    tokens, times, past = list(prompt), [], None
    with torch.inference_mode():
        ids = torch.tensor([prompt])
        for _ in range(steps):
            start = time.perf_counter()
            out = model(input_ids=ids, past_key_values=past, use_cache=True)
            times.append(time.perf_counter() - start)
            past, nxt = out.past_key_values, int(out.logits[0, -1].argmax())
            tokens.append(nxt)
            ids = torch.tensor([[nxt]])
    return tokens[len(prompt) :], statistics.median(times[1:])


class Decoder:
    """Batch-1 decode of one sequence over a paged cache, one step at a time."""

    def __init__(self, compiled: kiln.CompiledModel, prompt: list[int], max_len: int) -> None:
        self.compiled, self.tokens = compiled, list(prompt)
        self.table = [list(range(-(-max_len // BLOCK)))]
        self.caches = compiled.allocate_kv_cache(len(self.table[0]), BLOCK)
        meta = AttentionMetadata.build([len(prompt)], [0], self.table, BLOCK)
        self.last = compiled(torch.tensor(prompt), torch.arange(len(prompt)), meta, self.caches)

    def step(self) -> float:
        nxt = int(self.last[0].argmax())
        pos = len(self.tokens)
        self.tokens.append(nxt)
        meta = AttentionMetadata.build([1], [pos], self.table, BLOCK)
        start = time.perf_counter()
        self.last = self.compiled(torch.tensor([nxt]), torch.tensor([pos]), meta, self.caches)
        return time.perf_counter() - start


def teacher_forced(
    compiled: kiln.CompiledModel, sequence: list[int], targets: list[int], reference: torch.Tensor
) -> tuple[float, float]:
    """(top-1 agreement, mean |logit - HF's logit|) at each of the last len(targets) positions, all logits
    from one packed prefill; `reference` holds HF fp32's logits at those positions."""
    table = [list(range(-(-len(sequence) // BLOCK)))]
    meta = AttentionMetadata.build([len(sequence)], [0], table, BLOCK)
    meta.logits_indices = torch.arange(len(sequence))
    logits = compiled(
        torch.tensor(sequence), torch.arange(len(sequence)), meta, compiled.allocate_kv_cache(len(table[0]), BLOCK)
    )[len(sequence) - len(targets) - 1 : -1]
    agree = float((logits.argmax(-1) == torch.tensor(targets)).float().mean())
    return agree, float((logits.float() - reference).abs().mean())


def margins(model: torch.nn.Module, sequence: list[int], steps: int) -> torch.Tensor:
    """HF fp32's logits at the last `steps` positions that predict, and a line on their top-1 margins: how far
    the best logit is ahead of the second, next to the logits' spread. A random-weight model is nearly
    uniform, so small errors flip its argmax; a trained model's margins are far wider."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([sequence])).logits[0, len(sequence) - steps - 1 : -1].float()
    top = logits.topk(2, -1).values
    gap = top[:, 0] - top[:, 1]
    print(
        f"HF fp32 top-1 margin over the {steps} teacher-forced positions: median {gap.median():.3f}, "
        f"10th percentile {gap.quantile(0.1):.3f} (logit std {logits.std():.3f}, top-1 probability median "
        f"{logits.softmax(-1).max(-1).values.median():.5f})"
    )
    return logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared machine)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed per engine per round")
    parser.add_argument("--kv-budget-mib", type=int, default=64)
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument(
        "--weights",
        choices=("trained", "random"),
        default="trained",
        help="trained: a few minutes on a toy language first (cached; see toy_language.py)",
    )
    parser.add_argument("--isa", help="comma-separated levels to time in this run (default: the process's own)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    level = cpu_kernels.isa()
    levels = args.isa.split(",") if args.isa else [level]

    def at(lv: str | None) -> contextlib.AbstractContextManager[None]:
        return cpu_kernels.at_level(lv) if args.isa and lv else contextlib.nullcontext()

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.2f}; torch {torch.__version__}, transformers {transformers.__version__}\n"
        f"CPU: {cpu_build.cpu_description()}; C kernels: "
        f"{', '.join('none (torch references)' if lv is None else cpu_build.ISA_NAMES[lv] for lv in levels)}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        if args.weights == "trained":
            path = toy_language.trained_checkpoint(MODEL_SHAPE)
            prompt = toy_language.prompt(MODEL_SHAPE["vocab_size"], PROMPT)
        else:
            path = build_tiny_checkpoint("llama", Path(tmp) / "llama-110m", with_tokenizer=False, **MODEL_SHAPE)
            prompt = list(range(10, 10 + PROMPT))
        print(f"weights: {args.weights} ({path.name})", flush=True)
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        engines: dict[str, kiln.CompiledModel] = {}
        for name in args.engines.split(","):
            start = time.perf_counter()
            engines[name] = kiln.compile(path, quantization=ENGINES[name][0], kv_cache_dtype=ENGINES[name][1])
            q = engines[name].report.quantization
            calibration = ""
            if q:
                worst = max(q["layer_errors"] or [0])
                calibration = f"; calibration top-1 {q['top1_agreement']:.1%}, worst layer error {worst:.4f}"
            print(f"compiled {name} in {time.perf_counter() - start:.1f}s{calibration}", flush=True)
    target, hf_step = hf_greedy(hf, prompt, TOKENS)
    weight_mib = sum(p.nbytes for p in hf.parameters()) / 2**20
    print(f"HF fp32: {1 / hf_step:.1f} tok/s batch-1 decode, weights {weight_mib:.0f} MiB")
    reference = margins(hf, prompt + target, TOKENS)
    max_len = PROMPT + TOKENS + args.rounds * args.steps + 8
    decoders = {name: Decoder(e, prompt, max_len) for name, e in engines.items()}
    times: dict[tuple[str, str | None], list[float]] = {(name, lv): [] for name in engines for lv in levels}
    with torch.inference_mode():
        for r in range(args.rounds):
            print(f"round {r}: load average {os.getloadavg()[0]:.2f}", flush=True)
            for lv in levels[:: 1 if r % 2 else -1]:
                with at(lv):
                    for name in list(decoders)[:: 1 if r % 2 else -1]:
                        times[name, lv] += [decoders[name].step() for _ in range(args.steps)]
    print(
        f"\n{'engine':<14}{'weights MiB':>12}{'tok/s':>8}{'vs first':>9}{'vs HF':>7}{'teacher-forced':>16}"
        f"{'logit err':>10}{'greedy':>8}{'KV blocks':>11}  path"
    )
    budget = args.kv_budget_mib * 2**20
    for lv in levels:
        base = statistics.median(times[next(iter(engines)), lv])
        for name, e in engines.items():
            step = statistics.median(times[name, lv])
            with at(lv):
                greedy = Decoder(e, prompt, PROMPT + TOKENS + 1)
                for _ in range(TOKENS - 1):
                    greedy.step()
                accuracy = teacher_forced(e, prompt + target, target, reference)
            generated = greedy.tokens[PROMPT:] + [int(greedy.last[0].argmax())]
            same = sum(a == b for a, b in zip(generated, target)) / TOKENS
            print(
                f"{name:<14}{weight_bytes(e) / 2**20:>12.0f}{1 / step:>8.1f}{base / step:>8.2f}x{hf_step / step:>6.2f}x"
                "{:>16.1%}{:>10.4f}".format(*accuracy)
                + f"{same:>8.1%}"
                f"{budget // e.kv_cache_bytes_per_block(BLOCK):>11}  {lv or 'torch only'}"
            )
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
