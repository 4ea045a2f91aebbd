"""GPU benchmark of backend "triton": the codegen tests on the GPU, kernel bandwidth against a measured
device-to-device copy, and decode tokens/s of a Llama-3.2-1B-shaped random bf16 model against HF eager and HF
with torch.compile (static cache), all in one run; results as JSON in bench/results/.

    bench/gpu.sh [--steps 128] [--batch 1] [--skip-tests]
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import transformers

LLAMA_1B = dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                intermediate_size=8192, num_hidden_layers=16, vocab_size=128256, max_position_embeddings=4096,
                rope_theta=500000.0, tie_word_embeddings=True)
BLOCK_SIZE = 16
REPO = Path(__file__).resolve().parent.parent


def run_tests() -> dict:
    """tests/codegen on the GPU (kernels compiled for real, CUDA-graph test included)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "tests/codegen"], cwd=REPO,
                          capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    return {"returncode": proc.returncode, "summary": lines[-1] if lines else proc.stderr[-2000:]}


def cuda_time(fn: Callable[[], object], iters: int = 50, warmup: int = 5) -> float:
    """Median seconds per call, timed with CUDA events (triton.testing.do_bench's method, without autotune)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def kernel_bandwidth() -> dict:
    """Achieved GB/s (bytes a kernel must move / its time) for each memory-bound kernel, and vs a D2D copy."""
    from kiln.codegen import launchers
    from kiln.compiler.metadata import AttentionMetadata

    dev, bf16 = "cuda", torch.bfloat16
    src = torch.empty(256 << 20, dtype=bf16, device=dev)
    dst = torch.empty_like(src)
    copy_gbs = 2 * src.nbytes / cuda_time(lambda: dst.copy_(src)) / 1e9
    del src, dst
    results = {"d2d_copy": {"gb_per_s": copy_gbs}}

    def record(name: str, nbytes: int, fn: Callable[[], object]) -> None:
        gbs = nbytes / cuda_time(fn) / 1e9
        results[name] = {"gb_per_s": gbs, "fraction_of_copy": gbs / copy_gbs, "bytes": nbytes}

    x, w = torch.randn(16384, 2048, dtype=bf16, device=dev), torch.randn(2048, dtype=bf16, device=dev)
    record("rms_norm", 2 * x.nbytes + w.nbytes, lambda: launchers.rms_norm(x, w, 1e-5, 0.0))
    gate_up = torch.randn(8192, 2 * 8192, dtype=bf16, device=dev)
    record("silu_mul", gate_up.nbytes * 3 // 2, lambda: launchers.silu_mul(gate_up))
    q, k = torch.randn(16384, 32, 64, dtype=bf16, device=dev), torch.randn(16384, 8, 64, dtype=bf16, device=dev)
    positions = torch.randint(0, 4096, (16384,), device=dev)
    cos_sin = torch.randn(4096, 64, device=dev)
    record("rope", 2 * (q.nbytes + k.nbytes) + positions.nbytes + 16384 * 64 * 4,
           lambda: launchers.rope(q, k, positions, cos_sin, 64, True))
    del x, gate_up, q, k
    seqs, context = 64, 2048
    per_seq = context // BLOCK_SIZE + 1
    tables = [[s * per_seq + b for b in range(per_seq)] for s in range(seqs)]
    meta = AttentionMetadata.build([1] * seqs, [context - 1] * seqs, tables, BLOCK_SIZE, device=dev)
    caches = [torch.randn(seqs * per_seq, BLOCK_SIZE, 8, 64, dtype=bf16, device=dev) for _ in range(2)]
    q, kv = torch.randn(seqs, 32, 64, dtype=bf16, device=dev), torch.randn(seqs, 8, 64, dtype=bf16, device=dev)
    kv_bytes = 2 * seqs * context * 8 * 64 * 2
    record("paged_decode_attention", kv_bytes + 2 * q.nbytes, lambda: launchers.paged_attention(
        q, kv, kv, *caches, meta.slot_mapping, meta.block_tables, meta.seq_lens, meta.query_start_loc, 0.125, 0, 0.0))
    return results


def _hf_decode_tps(model: transformers.PreTrainedModel, ids: torch.Tensor, steps: int) -> float:
    """New tokens/s of greedy generate, prefill excluded: (time for steps+1 tokens - time for 1) / steps."""
    def timed(n: int) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    timed(steps + 1), timed(1)  # warm-up (and torch.compile's captures)
    return ids.shape[0] * steps / (timed(steps + 1) - timed(1))


def _kiln_decode_tps(model: transformers.PreTrainedModel, prompt: torch.Tensor, steps: int, graphs: bool) -> float:
    import kiln
    from kiln.codegen.cuda_graphs import DecodeGraphs
    from kiln.compiler.metadata import AttentionMetadata

    compiled = kiln.compile(model, backend="triton")
    batch, plen = prompt.shape
    dev = prompt.device
    per_seq = -(-(plen + steps + 2) // BLOCK_SIZE)
    tables = [[s * per_seq + b for b in range(per_seq)] for s in range(batch)]
    caches = compiled.allocate_kv_cache(batch * per_seq, BLOCK_SIZE)
    step = compiled
    if graphs:
        step = DecodeGraphs(compiled, caches, per_seq, buckets=(batch,))
        step.capture()

    def generate(n: int) -> None:
        meta = AttentionMetadata.build([plen] * batch, [0] * batch, tables, BLOCK_SIZE, device=dev)
        logits = compiled(prompt.flatten(), torch.arange(plen, device=dev).repeat(batch), meta, caches)
        for i in range(n):
            meta = AttentionMetadata.build([1] * batch, [plen + i] * batch, tables, BLOCK_SIZE, device=dev)
            logits = step(logits.argmax(-1), torch.full((batch,), plen + i, device=dev), meta, caches)

    def timed(n: int) -> float:
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        sync()
        t = time.perf_counter()
        generate(n)
        sync()
        return time.perf_counter() - t

    timed(steps)
    return batch * steps / (timed(steps) - timed(0))


def decode_throughput(steps: int, batch: int, prompt_len: int = 128) -> dict:
    """Llama-3.2-1B-shaped random bf16 model: kiln (graphs and eager) vs HF eager vs HF + torch.compile."""
    config = transformers.LlamaConfig(**LLAMA_1B)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    prompt = torch.randint(3, config.vocab_size, (batch, prompt_len), device="cuda")
    out = {"batch": batch, "prompt_len": prompt_len, "steps": steps}
    # Not under inference_mode: torch.export (in kiln.compile) refuses inference tensors; generate and the
    # compiled forward turn off autograd themselves.
    out["kiln_triton_cuda_graphs_tok_s"] = _kiln_decode_tps(model, prompt, steps, graphs=True)
    out["kiln_triton_eager_tok_s"] = _kiln_decode_tps(model, prompt, steps, graphs=False)
    out["hf_eager_tok_s"] = _hf_decode_tps(model, prompt, steps)
    model.generation_config.cache_implementation = "static"
    model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    out["hf_torch_compile_tok_s"] = _hf_decode_tps(model, prompt, steps)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA GPU")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version()}
    if not args.skip_tests:
        result["tests"] = run_tests()
    result["kernel_bandwidth"] = kernel_bandwidth()
    result["decode"] = decode_throughput(args.steps, args.batch)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gpu-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
