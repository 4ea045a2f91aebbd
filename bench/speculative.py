"""Decode tokens/s with and without n-gram speculation, same run, on a workload it helps and on a hopeless one.

helpful: a ~30M-parameter Llama briefly trained on bench/toy_language.py's Markov language (each token has one
likely successor), prompted with walks of that language and decoded greedily. Its greedy continuation follows
the likely successors, which the prompt already shows and which soon cycle, so prompt lookup predicts it.
hopeless: the same shape with random weights over a 64-token vocabulary, greedily decoded: every token has
appeared before, so 1-gram lookup always proposes, but the continuation is chaotic and the proposals fail;
this measures what speculation costs when it cannot help (the back-off of speculator.py keeps it small).
draft_model (helpful workload only): the trained model's first 2 of 8 layers (same embeddings and head).

For each workload and batch (B sequences with different prompts), the engine prefills, then the decode steps
until every sequence has its max_tokens are timed; plain and speculative runs alternate, REPEATS times, and
the medians are reported with the acceptance statistics of the speculative runs.

    python -m kiln.bench.speculative --batch 1 8 --tokens 128 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import transformers

import kiln
from kiln.bench import toy_language
from kiln.models.testing import build_tiny_checkpoint
from kiln.runtime.engine import LLMEngine
from kiln.runtime.sampling_params import SamplingParams

SHAPE = dict(
    vocab_size=8192,
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=64,
    max_position_embeddings=1024,
    initializer_range=0.02,
)
HOPELESS_VOCAB = 64
DRAFT_LAYERS = 2
PROMPT_LEN = 64
RESULTS = Path(__file__).resolve().parent / "results" / "speculative_cpu.txt"


def decode_rate(compiled: Any, prompts: list[list[int]], tokens: int, spec: dict | None) -> tuple[float, float, dict]:
    """Decode tokens per second of wall time and of the stepping thread's CPU time (prefill excluded), and the
    engine's stats. With one torch thread all work runs on that thread, so its CPU time is not inflated by
    other processes taking the core."""
    engine = LLMEngine(compiled, num_kv_blocks=len(prompts) * 20 + 8, block_size=16, speculative_config=spec)
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    while any(not s.output_token_ids for r in engine.requests.values() for s in r.seqs):
        engine.step()  # prefill: every sequence has its first token
    done = sum(len(s.output_token_ids) for r in engine.requests.values() for s in r.seqs)
    start, cpu = time.perf_counter(), time.thread_time()
    while engine.has_unfinished_requests():
        engine.step()
    elapsed, cpu = time.perf_counter() - start, time.thread_time() - cpu
    decoded = len(prompts) * tokens - done
    return decoded / elapsed, decoded / cpu, engine.stats()


def truncated_draft(path: Path, layers: int, out: Path) -> Path:
    """The trained model's first `layers` decoder layers with its embeddings, final norm and head: a draft of the
    same family and tokenizer that costs layers / num_hidden_layers of the target per token."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    model.save_pretrained(out)
    return out


def workloads(tmp: Path, k: int, names: list[str]) -> list[tuple[str, Any, list[list[int]], dict[str, dict]]]:
    """(name, compiled model, 8 prompts, {method: speculative_config}) per workload named."""
    ngram = {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 4, "prompt_lookup_min": 1}
    path = toy_language.trained_checkpoint(SHAPE)
    draft = kiln.compile(str(truncated_draft(path, DRAFT_LAYERS, tmp / "draft")), device="cpu")
    helpful = [toy_language.prompt(SHAPE["vocab_size"], PROMPT_LEN, seed=1 + i) for i in range(8)]
    shape = {**SHAPE, "vocab_size": HOPELESS_VOCAB, "initializer_range": 0.1}
    random_dir = build_tiny_checkpoint("llama", tmp / "random", with_tokenizer=False, **shape)
    rng = torch.Generator().manual_seed(0)
    hopeless = [torch.randint(HOPELESS_VOCAB, (PROMPT_LEN,), generator=rng).tolist() for _ in range(8)]
    drafted = {"method": "draft_model", "model": draft, "num_speculative_tokens": k}
    make = {
        "helpful": lambda: (kiln.compile(str(path), device="cpu"), helpful, {"ngram": ngram, "draft_model": drafted}),
        "hopeless": lambda: (kiln.compile(str(random_dir), device="cpu"), hopeless, {"ngram": ngram}),
    }
    return [(name, *make[name]()) for name in names]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tokens", type=int, default=128, help="output tokens per sequence")
    parser.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared machine)")
    parser.add_argument("--workloads", nargs="+", choices=["helpful", "hopeless"], default=["helpful", "hopeless"])
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    lines = [
        f"$ python -m kiln.bench.speculative {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip(),
        f"machine: {platform.machine()} {platform.processor() or platform.platform()}, {os.cpu_count()} CPUs, "
        f"torch threads {torch.get_num_threads()}; python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}",
        f"target: Llama {SHAPE['hidden_size']} hidden x {SHAPE['num_hidden_layers']} layers; draft_model: its "
        f"first {DRAFT_LAYERS} layers; num_speculative_tokens {args.k}; ngram prompt_lookup 1..4; "
        f"{args.tokens} output tokens per sequence, prompts of {PROMPT_LEN}; median of {args.repeats}",
        "tok/s of wall time, and of the stepping thread's CPU time (robust to other processes on the machine)",
        "",
        "| workload | method | batch | plain tok/s | spec tok/s | speedup | plain CPU tok/s | spec CPU tok/s "
        "| CPU speedup | acceptance | mean accepted length | drafts |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, compiled, prompts, methods in workloads(Path(tmp), args.k, args.workloads):
            for config in methods.values():
                decode_rate(compiled, prompts[:1], 8, config)  # warm-up
            for batch in args.batch:
                configs: dict[str, dict | None] = {"plain": None, **methods}
                runs: dict[str, list[tuple[float, float]]] = {mode: [] for mode in configs}
                stats: dict[str, dict] = {}
                for r in range(args.repeats):  # interleaved, the order rotating
                    order = list(configs)[r % len(configs) :] + list(configs)[: r % len(configs)]
                    for mode in order:
                        wall, cpu, stats[mode] = decode_rate(compiled, prompts[:batch], args.tokens, configs[mode])
                        runs[mode].append((wall, cpu))
                p = statistics.median(w for w, _ in runs["plain"])
                pc = statistics.median(c for _, c in runs["plain"])
                for mode in methods:
                    f = statistics.median(w for w, _ in runs[mode])
                    fc = statistics.median(c for _, c in runs[mode])
                    st = stats[mode]
                    row = (
                        f"| {name} | {mode} | {batch} | {p:.1f} | {f:.1f} | {f / p:.2f}x | {pc:.1f} | {fc:.1f} "
                        f"| {fc / pc:.2f}x | {st['spec_acceptance_rate']:.2f} | {st['spec_mean_accepted_length']:.2f} "
                        f"| {st['spec_num_drafts']} |"
                    )
                    lines.append(row)
                    print(row, flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
