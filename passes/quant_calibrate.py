"""Calibration for the quantize pass: run the (partly rewritten) graph on calibration tokens, record what the
linears read, and search per-input-channel scales (AWQ for int4, SmoothQuant for w8a8) on those activations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, fx

from kiln.backends.cpu.lowering import op_calls
from kiln.ops.metadata import AttentionMetadata

from .fuse_common import arg_node

BLOCK_SIZE = 16


def calibration_tokens(vocab_size: int, prompts: int = 2, length: int = 64, seed: int = 0) -> list[list[int]]:
    """Seeded random token ids (ids 0-3 are special in kiln's test checkpoints): no corpus or tokenizer needed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab_size, (prompts, length), generator=g).tolist()


class _Recorder(fx.Interpreter):
    """Runs the graph node by node, keeping the input activation [tokens, K] of each watched linear."""

    def __init__(self, gm: fx.GraphModule, watch: set[fx.Node]) -> None:
        super().__init__(gm)
        self.watch = watch
        self.inputs: dict[fx.Node, Tensor] = {}
        self.calls = op_calls()  # kiln ops with a CPU kernel run it here as in the compiled model

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        return super().call_function(self.calls.get(target, target), args, kwargs)

    def run_node(self, n: fx.Node) -> Any:
        if n in self.watch:
            x = self.env[arg_node(n, 0)]
            self.inputs[n] = x.detach().reshape(-1, x.shape[-1]).float()
        return super().run_node(n)


def run_graph(
    gm: fx.GraphModule,
    prompts: list[list[int]],
    kv_shapes: list[tuple[int, int, int]],
    cache_dtype: torch.dtype,
    cache_extra: int = 0,
    watch: set[fx.Node] | None = None,
) -> tuple[Tensor, dict[fx.Node, Tensor]]:
    """A packed prefill of `prompts` (logits at every position, for teacher-forced comparison) on fresh caches.

    kv_shapes: (kv_heads, head_dim, v_head_dim) per layer; cache_extra: elements appended to each cached
    vector (a quantized cache's inline scale)."""
    per_seq = [-(-len(p) // BLOCK_SIZE) for p in prompts]
    starts = [sum(per_seq[:i]) for i in range(len(prompts))]
    tables = [list(range(s, s + n)) for s, n in zip(starts, per_seq)]
    meta = AttentionMetadata.build([len(p) for p in prompts], [0] * len(prompts), tables, BLOCK_SIZE)
    meta.logits_indices = torch.arange(sum(len(p) for p in prompts))
    caches = [
        torch.zeros(sum(per_seq), BLOCK_SIZE, heads, dim + cache_extra, dtype=cache_dtype)
        for heads, k_dim, v_dim in kv_shapes
        for dim in (k_dim, v_dim)
    ]
    ids = torch.tensor([t for p in prompts for t in p])
    pos = torch.cat([torch.arange(len(p)) for p in prompts])
    recorder = _Recorder(gm, watch or set())
    with torch.inference_mode():
        logits = recorder.run(ids, pos, *meta.graph_inputs(), *caches)
    return logits.float().reshape(-1, logits.shape[-1]), recorder.inputs


def relative_error(y: Tensor, ref: Tensor) -> float:
    return float((y - ref).norm() / ref.norm().clamp(min=1e-12))


Forward = Callable[[Tensor, Tensor], Tensor]  # (activations / s, weight * s) -> quantized output


def search_input_scale(x: Tensor, w: Tensor, forward: Forward, candidates: list[Tensor]) -> tuple[Tensor | None, float]:
    """The per-input-channel scale s (weights times s, activations divided by s) with the lowest output error
    on the calibration activations; None when no candidate beats plain quantization."""
    ref = x @ w.float().t()
    best, best_err = None, relative_error(forward(x, w.float()), ref)
    for s in candidates:
        err = relative_error(forward(x / s, w.float() * s), ref)
        if err < best_err:
            best, best_err = s, err
    return best, best_err


def awq_candidates(x: Tensor, grid: int = 10) -> list[Tensor]:
    """AWQ: s = mean|x_j|^alpha for alpha in (0, 1], normalised so that the scales straddle 1."""
    mean = x.abs().mean(0).clamp(min=1e-5)
    out = []
    for i in range(1, grid + 1):
        s = mean.pow(i / grid)
        out.append(s / (s.max() * s.min()).sqrt())
    return out


def smooth_candidates(x: Tensor, w: Tensor, alphas: tuple[float, ...] = (0.25, 0.5, 0.75)) -> list[Tensor]:
    """SmoothQuant: s_j = max|x_j|^alpha / max|w_j|^(1 - alpha), moving activation outliers into the weights."""
    xmax = x.abs().amax(0).clamp(min=1e-5)
    wmax = w.float().abs().amax(0).clamp(min=1e-5)
    return [(xmax.pow(a) / wmax.pow(1 - a)).clamp(min=1e-5) for a in alphas]
