"""Offline throughput: kiln's LLM vs Hugging Face `generate` (static batches) and `generate_batch` (continuous).

N requests with random prompt lengths (16-256) and output lengths (16-96), greedy, EOS ignored, on a ~30M
parameter random Llama (hidden 512, 8 layers, 8 heads / 4 KV heads, vocab 8192). Reports *useful* output
tokens per second: tokens a request asked for. A static batch keeps generating until its longest request is
done; those extra tokens are not counted.

    python -m kiln.bench.offline_throughput --num-requests 64
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

MODEL_SHAPE = dict(
    vocab_size=8192,
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=1024,
)
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


def build_model(path: Path) -> transformers.PreTrainedModel:
    config = transformers.LlamaConfig(
        **MODEL_SHAPE, initializer_range=0.05, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(path)
    return model


def workload(num: int, seed: int) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, MODEL_SHAPE["vocab_size"]) for _ in range(rng.randint(16, 256))] for _ in range(num)]
    return prompts, [rng.randint(16, 96) for _ in range(num)]


def run_kiln(path: Path, prompts: list[list[int]], outputs: list[int], args: argparse.Namespace):
    from kiln.runtime.llm import LLM
    from kiln.runtime.sampling_params import SamplingParams

    start = time.perf_counter()
    llm = LLM(str(path), backend=args.backend, max_num_seqs=args.max_num_seqs)
    compile_s = time.perf_counter() - start
    warm_up = [[3] * 32, [4] * 16]  # not from the workload, so the prefix cache starts cold
    llm.generate(warm_up, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in outputs]
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    assert [len(o.outputs[0].token_ids) for o in outs] == outputs
    return elapsed, [o.outputs[0].token_ids for o in outs], compile_s, llm.stats()


def run_hf_static(model, prompts: list[list[int]], outputs: list[int], batch_size: int):
    """Left-padded static batches; each batch runs until its longest request is done."""
    results: list[list[int]] = []
    start = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        batch, targets = prompts[i : i + batch_size], outputs[i : i + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[PAD_ID] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=max(targets),
                min_new_tokens=max(targets),
                pad_token_id=PAD_ID,
            )
        results += [row[width : width + n].tolist() for row, n in zip(out, targets)]
    return time.perf_counter() - start, results


def run_hf_continuous(model, prompts: list[list[int]], outputs: list[int]):
    """`generate_batch`: HF's continuous batching; one max_new_tokens for all, so count only useful tokens."""
    config = transformers.GenerationConfig(
        max_new_tokens=max(outputs), do_sample=False, eos_token_id=-1, pad_token_id=PAD_ID
    )
    start = time.perf_counter()
    with torch.no_grad():  # generate_batch updates its own tensors in place: inference_mode breaks it
        result = model.generate_batch(inputs=prompts, generation_config=config)
    elapsed = time.perf_counter() - start
    ordered = sorted(result.values(), key=lambda r: int(str(r.request_id).rsplit("_", 1)[-1]))
    tokens = [list(r.generated_tokens)[:n] for r, n in zip(ordered, outputs)]
    if len(tokens) != len(prompts) or [len(t) for t in tokens] != outputs:
        raise RuntimeError("generate_batch returned incomplete results (see its log above)")
    return elapsed, tokens


def load_note() -> str:
    """The 1-minute load average: other processes on the machine skew every number here."""
    return f"load avg {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--skip-hf", action="store_true", help="run kiln only")
    parser.add_argument("--skip-generate-batch", action="store_true")
    args = parser.parse_args(argv)

    print(
        f"machine: {platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()} "
        f"torch_threads={torch.get_num_threads()} python={platform.python_version()}"
    )
    print(f"versions: torch={torch.__version__} transformers={transformers.__version__}")
    prompts, outputs = workload(args.num_requests, args.seed)
    useful = sum(outputs)
    print(
        f"workload: {len(prompts)} requests, prompt tokens={sum(map(len, prompts))}, "
        f"useful output tokens={useful}, greedy, ignore_eos"
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "llama-30m"
        model = build_model(path)
        print(f"model: Llama {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, fp32, {MODEL_SHAPE}")
        rows = []
        print(f"before kiln: {load_note()}", flush=True)
        kiln_s, kiln_tokens, compile_s, stats = run_kiln(path, prompts, outputs, args)
        rows.append(("kiln LLM.generate", kiln_s))
        print(
            f"kiln: {kiln_s:.2f}s, {useful / kiln_s:.1f} useful tok/s (compile {compile_s:.1f}s, "
            f"{stats['num_steps']} steps, preemptions={stats['preemptions']})",
            flush=True,
        )
        if not args.skip_hf:
            print(f"before HF generate: {load_note()}", flush=True)
            hf_s, hf_tokens = run_hf_static(model, prompts, outputs, args.hf_batch_size)
            rows.append((f"HF generate (static batches of {args.hf_batch_size})", hf_s))
            print(f"HF generate: {hf_s:.2f}s", flush=True)
            same = sum(a == b for a, b in zip(kiln_tokens, hf_tokens))
            print(f"greedy agreement kiln vs HF generate: {same}/{len(prompts)} requests identical", flush=True)
            if not args.skip_generate_batch:
                print(f"before HF generate_batch: {load_note()}", flush=True)
                try:
                    cb_s, cb_tokens = run_hf_continuous(model, prompts, outputs)
                    rows.append(("HF generate_batch (continuous)", cb_s))
                    same = sum(a == b for a, b in zip(kiln_tokens, cb_tokens))
                    print(f"greedy agreement kiln vs HF generate_batch: {same}/{len(prompts)}", flush=True)
                except Exception as exc:  # report, but keep the other numbers
                    print(f"HF generate_batch failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    print(f"\n{'engine':44s} {'seconds':>8s} {'useful tok/s':>13s} {'kiln speedup':>13s}")
    for name, seconds in rows:
        print(f"{name:44s} {seconds:8.2f} {useful / seconds:13.1f} {seconds / kiln_s:12.2f}x")


if __name__ == "__main__":
    main()
