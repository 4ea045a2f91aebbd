"""Phases 2 and 3 of bench/gpu.py: kernel bandwidth against a copy, and decode tokens/s against HF.

Bandwidth: bytes a kernel must move / its median time, next to a device-to-device copy of the same scale
(rms_norm, add_rms_norm, silu_mul and rope at 16,384 rows; paged decode attention at 64 x 2,048 and at 1 x 8,192
cached tokens); then the pointwise kernels at decode sizes (1, 16, 64 rows) in microseconds against the same op
in eager torch (kiln's reference ops).
Decode: new tokens/s after a 128-token prompt, kiln (CUDA graphs and eager) vs HF eager vs HF + torch.compile,
where HF compiles the way its 5.x releases document (CompileConfig's docstring) and test it
(test_generate_compile_model_forward_fullgraph): `generate(..., cache_implementation="static",
compile_config=CompileConfig(fullgraph=True, mode="reduce-overhead"))`, so generate compiles its own decode step.
This script's previous version also wrapped `model.forward` in torch.compile by hand, on top of generate's own
compilation, and crashed on transformers 5.17 with "accessing tensor output of CUDAGraphs that has been
overwritten by a subsequent run".
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .gpu_common import FIRST_ID, Recorder, build_model, guarded, median_time, peer, time_left, wall

BLOCK_SIZE = 16
# name -> (rows, hidden, intermediate, heads, kv_heads, head_dim, attention seqs, attention context)
SHAPES = {"full": (16384, 2048, 8192, 32, 8, 64, 64, 2048), "tiny": (16, 64, 128, 4, 2, 16, 2, 64)}
# Decode attention (sequences, cached tokens each): a full batch, and one long sequence (the split-KV case).
ATTENTION = {"full": ((64, 2048), (1, 8192)), "tiny": ((2, 64), (1, 128))}
DECODE_ROWS = (1, 16, 64)  # decode-sized pointwise launches, timed against torch's eager ops


def bandwidth(args: argparse.Namespace, rec: Recorder) -> None:
    """Each kernel guarded on its own: one that fails to compile costs only its own figure."""
    from kiln.codegen.kernels import gated_act_plan, paged_attention_plan, rms_norm_plan, rope_plan
    from kiln.ops import fused
    from kiln.ops.metadata import AttentionMetadata

    dev, dtype = args.device, args.torch_dtype
    rows, hidden, inter, heads, kv_heads, hd, seqs, context = SHAPES["tiny" if args.tiny else "full"]
    iters, warmup = (3, 1) if args.tiny else (50, 5)
    copy = {}

    def measure_copy() -> None:
        src = torch.empty(256 << (10 if args.tiny else 20), dtype=dtype, device=dev)
        dst = torch.empty_like(src)
        copy["gb_per_s"] = 2 * src.nbytes / median_time(lambda: dst.copy_(src), dev, iters, warmup) / 1e9
        rec.figure("d2d_copy", gb_per_s=copy["gb_per_s"], bytes=2 * src.nbytes)

    guarded(rec, "d2d_copy", min(60, time_left(args)), measure_copy)

    def kernel(name: str, make: Callable[[], tuple[int, Callable[[], Any]]]) -> None:
        def run() -> None:
            nbytes, fn = make()
            gbs = nbytes / median_time(fn, dev, iters, warmup) / 1e9
            rec.figure(name, gb_per_s=gbs, fraction_of_copy=gbs / copy["gb_per_s"] if copy else None, bytes=nbytes)

        guarded(rec, name, min(90, time_left(args)), run)

    def rms() -> tuple[int, Callable[[], Any]]:
        x, w = torch.randn(rows, hidden, dtype=dtype, device=dev), torch.randn(hidden, dtype=dtype, device=dev)
        return 2 * x.nbytes + w.nbytes, lambda: rms_norm_plan.rms_norm(x, w, 1e-5, 0.0)

    def add_rms() -> tuple[int, Callable[[], Any]]:
        x, res = (torch.randn(rows, hidden, dtype=dtype, device=dev) for _ in range(2))
        w = torch.randn(hidden, dtype=dtype, device=dev)
        return 4 * x.nbytes + w.nbytes, lambda: rms_norm_plan.add_rms_norm(x, res, w, 1e-5, 0.0)

    def silu() -> tuple[int, Callable[[], Any]]:
        gate_up = torch.randn(rows // 2, 2 * inter, dtype=dtype, device=dev)
        return gate_up.nbytes * 3 // 2, lambda: gated_act_plan.silu_mul(gate_up)

    def rope() -> tuple[int, Callable[[], Any]]:
        q = torch.randn(rows, heads, hd, dtype=dtype, device=dev)
        k = torch.randn(rows, kv_heads, hd, dtype=dtype, device=dev)
        positions = torch.randint(0, context, (rows,), device=dev)
        cos_sin = torch.randn(context, hd, device=dev)
        nbytes = 2 * (q.nbytes + k.nbytes) + positions.nbytes + rows * hd * 4
        return nbytes, lambda: rope_plan.rope(q, k, positions, cos_sin, hd, True)

    def decode_attention(seqs: int, context: int) -> tuple[int, Callable[[], Any]]:
        per_seq = context // BLOCK_SIZE + 1
        tables = [[s * per_seq + b for b in range(per_seq)] for s in range(seqs)]
        meta = AttentionMetadata.build([1] * seqs, [context - 1] * seqs, tables, BLOCK_SIZE, device=dev)
        caches = [torch.randn(seqs * per_seq, BLOCK_SIZE, kv_heads, hd, dtype=dtype, device=dev) for _ in range(2)]
        q = torch.randn(seqs, heads, hd, dtype=dtype, device=dev)
        kv = torch.randn(seqs, kv_heads, hd, dtype=dtype, device=dev)
        nbytes = 2 * seqs * context * kv_heads * hd * caches[0].element_size() + 2 * q.nbytes
        return nbytes, lambda: paged_attention_plan.paged_attention(
            q,
            kv,
            kv,
            *caches,
            meta.slot_mapping,
            meta.block_tables,
            meta.seq_lens,
            meta.query_start_loc,
            hd**-0.5,
            0,
            0.0,
        )

    kernels = {"rms_norm": rms, "add_rms_norm": add_rms, "silu_mul": silu, "rope": rope}
    for seqs, context in ATTENTION["tiny" if args.tiny else "full"]:
        kernels[f"paged_decode_attention_{seqs}x{context}"] = lambda s=seqs, c=context: decode_attention(s, c)
    for name, make in kernels.items():
        kernel(name, make)

    def at_decode_size(name: str, rows: int, ours: Callable[[Tensor], Any], theirs: Callable[[Tensor], Any]) -> None:
        def run() -> None:
            x = torch.randn(rows, 2 * inter if name == "silu_mul" else hidden, dtype=dtype, device=dev)
            us = [1e6 * median_time(lambda f=f: f(x), dev, iters, warmup) for f in (ours, theirs)]
            rec.figure(f"{name}_rows{rows}", kiln_us=us[0], torch_us=us[1], speedup=us[1] / us[0])

        guarded(rec, f"{name}_rows{rows}", min(60, time_left(args)), run)

    w = torch.randn(hidden, dtype=dtype, device=dev)
    res = torch.randn(DECODE_ROWS[-1], hidden, dtype=dtype, device=dev)
    pairs = {
        "rms_norm": (lambda x: rms_norm_plan.rms_norm(x, w, 1e-5, 0.0), lambda x: fused.rms_norm(x, w, 1e-5, 0.0)),
        "add_rms_norm": (
            lambda x: rms_norm_plan.add_rms_norm(x, res[: len(x)], w, 1e-5, 0.0),
            lambda x: fused.add_rms_norm(x, res[: len(x)], w, 1e-5, 0.0),
        ),
        "silu_mul": (gated_act_plan.silu_mul, fused.silu_mul),
    }
    for rows_ in DECODE_ROWS:
        for name, (ours, theirs) in pairs.items():
            at_decode_size(name, rows_, ours, theirs)


def _hf_decode_tps(model: Any, ids: torch.Tensor, steps: int, device: str, **generate_kwargs: Any) -> float:
    """New tokens/s of greedy generate, prefill excluded: (time for steps+1 tokens - time for 1) / steps.

    The longest call runs first, so a static cache is sized once and never re-created (nor recompiled)."""

    def timed(n: int) -> float:
        return wall(
            lambda: model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                **generate_kwargs,
            ),
            device,
        )

    timed(steps + 1), timed(1)  # warm-up, and torch.compile's captures
    return ids.shape[0] * steps / (timed(steps + 1) - timed(1))


def _kiln_decode(model: Any, prompt: torch.Tensor, steps: int, rec: Recorder) -> None:
    """kiln's compiled forward in a hand-written loop: the kernels and graphs alone, no scheduler."""
    import kiln
    from kiln.ops.metadata import AttentionMetadata

    dev = prompt.device
    start = time.perf_counter()
    compiled = kiln.compile(model, backend="triton" if dev.type == "cuda" else "reference")
    rec.figure("kiln_compile", seconds=time.perf_counter() - start, backend=compiled.backend)
    batch, plen = prompt.shape
    per_seq = -(-(plen + steps + 2) // BLOCK_SIZE)
    tables = [[s * per_seq + b for b in range(per_seq)] for s in range(batch)]
    caches = compiled.allocate_kv_cache(batch * per_seq, BLOCK_SIZE)

    def tps(step: Any) -> float:
        def generate(n: int) -> None:
            meta = AttentionMetadata.build([plen] * batch, [0] * batch, tables, BLOCK_SIZE, device=dev)
            logits = compiled(prompt.flatten(), torch.arange(plen, device=dev).repeat(batch), meta, caches)
            for i in range(n):
                meta = AttentionMetadata.build([1] * batch, [plen + i] * batch, tables, BLOCK_SIZE, device=dev)
                logits = step(logits.argmax(-1), torch.full((batch,), plen + i, device=dev), meta, caches)

        wall(lambda: generate(steps), dev.type)
        return batch * steps / (wall(lambda: generate(steps), dev.type) - wall(lambda: generate(0), dev.type))

    if dev.type == "cuda":
        from kiln.codegen.cuda_graphs import DecodeGraphs

        graphs = DecodeGraphs(compiled, caches, per_seq, buckets=(batch,))
        graphs.capture()
        rec.figure("kiln_triton_cuda_graphs", tok_per_s=tps(graphs))
    else:
        rec.status("kiln_cuda_graphs", "skipped", 0.0, reason="CUDA graphs need a GPU")
    rec.figure(f"kiln_{compiled.backend}_eager", tok_per_s=tps(compiled))


def _hf_compiled(model: Any, prompt: torch.Tensor, steps: int, device: str, rec: Recorder) -> None:
    """HF's documented 5.x path: a static cache, and generate compiles the decode step from compile_config."""
    import transformers

    if device.startswith("cuda"):
        config = transformers.CompileConfig(fullgraph=True, mode="reduce-overhead")
    else:  # CPU smoke mode: the same generate path, traced by dynamo without inductor's minutes of compiling
        config = transformers.CompileConfig(fullgraph=True, backend="eager", mode=None)
        config._compile_all_devices = True  # HF's own tests force compilation on CPU this way
    tps = _hf_decode_tps(model, prompt, steps, device, cache_implementation="static", compile_config=config)
    rec.figure("hf_torch_compile", tok_per_s=tps, mode=config.mode, backend=config.backend, fullgraph=True)


def decode(args: argparse.Namespace, rec: Recorder) -> None:
    """One model object for all peers, kiln first: kiln's compile sets its attention implementation to sdpa,
    HF's default anyway, and HF's compiled peer runs last so that its compiled forward touches nothing else."""
    model = build_model(args.tiny, args.device, args.torch_dtype)
    prompt_len = 16 if args.tiny else 128
    torch.manual_seed(1)
    prompt = torch.randint(FIRST_ID, model.config.vocab_size, (args.batch, prompt_len), device=args.device)
    rec.figure(
        "decode_setup",
        batch=args.batch,
        prompt_len=prompt_len,
        steps=args.steps,
        dtype=args.dtype,
        params=sum(p.numel() for p in model.parameters()),
    )
    peer(args, rec, "kiln", lambda: _kiln_decode(model, prompt, args.steps, rec))
    peer(
        args,
        rec,
        "hf_eager",
        lambda: rec.figure("hf_eager", tok_per_s=_hf_decode_tps(model, prompt, args.steps, args.device)),
    )
    peer(args, rec, "hf_compile", lambda: _hf_compiled(model, prompt, args.steps, args.device, rec))
