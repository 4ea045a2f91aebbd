"""Compiling one model, or one tensor-parallel rank's share of it: checkpoint in, CompiledModel out.
`kiln.compile` (api.py) calls this directly, or once per rank through tensor_parallel.py."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

import kiln.ops  # noqa: F401  (declares the kiln:: ops)

from .compiled import CompiledModel, KVLayout

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from kiln.passes.shard import ShardSpec

BACKENDS = ("auto", "reference", "triton")


def _eos_ids(generation_config: object, config: object) -> list[int]:
    for source in (generation_config, config):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if eos is not None:
            return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
    return []


def compile_shard(
    model: str | Path | PreTrainedModel,
    shard: ShardSpec | None,
    *,
    backend: str = "auto",
    dtype: str | torch.dtype | None = None,
    max_model_len: int | None = None,
    trust_remote_code: bool = False,
    quantization: str | None = None,
    kv_cache_dtype: str | None = None,
    device: str | torch.device | None = "auto",
    **options: bool,
) -> CompiledModel:
    """`compile` of a checkpoint (a directory or a PreTrainedModel) for one rank of a tensor-parallel group
    (`shard`), or whole (None)."""
    # Imported only now: starting from an artifact needs none of this (the model stack, export, passes,
    # codegen), and importing it is most of an artifact's cold start.
    from kiln.models.device import resolve_device
    from kiln.models.loader import load_model
    from kiln.models.registry import layer_windows
    from kiln.passes.base import PassContext, PassReport, run_passes
    from kiln.passes.quant_config import QuantConfig

    from .capture import capture, device_constants
    from .pipeline import build_pipeline

    if backend not in BACKENDS:
        raise ValueError(f"backend: {backend!r} is not available; choose one of {', '.join(BACKENDS)}")
    # A rank of a split model reads the checkpoint into host memory and moves only its share to its GPU, so that a
    # model too large for one GPU can be split across several (the passes never depend on the device).
    where = None
    if shard is not None and shard.size > 1 and resolve_device(device).type == "cuda":
        where, device = resolve_device(device), "cpu"
    loaded = load_model(model, dtype=dtype, trust_remote_code=trust_remote_code, device=device)
    where = where or loaded.model.device
    if backend == "auto":  # generated kernels run on a GPU; on CPU only the (slow) interpreter could
        backend = "triton" if where.type == "cuda" else "reference"
    config = loaded.model.config
    limit = int(getattr(config, "max_position_embeddings", 0) or getattr(config, "n_positions", 0) or 4096)
    if max_model_len is None:
        max_model_len = limit
    elif not 1 <= max_model_len <= limit:
        raise ValueError(f"max_model_len: {max_model_len} is outside 1..{limit} (the model's position limit)")
    quant = QuantConfig.parse(quantization, kv_cache_dtype)
    if loaded.prequantized is not None and shard is not None:
        raise ValueError("tensor_parallel_size: GPTQ / AWQ checkpoints' packed weights are not split across ranks yet")
    if loaded.prequantized is not None:  # a GPTQ / AWQ checkpoint: int4 from its own packed weights
        quant = loaded.prequantized.quant_config(quant, quantization)
    passes = build_pipeline(options, quant, backend, shard)
    gm = capture(loaded.model, max_model_len)
    ctx = PassContext(config=config, layer_windows=layer_windows(config))
    report = PassReport(num_layers=config.num_hidden_layers)
    run_passes(gm, passes, ctx, report)
    pinned = device_constants(gm)
    if pinned:  # an artifact must load on any device: a constant device in the graph would pin it
        raise RuntimeError(f"the compiled graph names a device at {', '.join(pinned)}; capture should not keep one")
    gm.to(where)
    report.quantization = ctx.quantization
    report.sharding = ctx.sharding
    layouts = [KVLayout(*shape) for shape in ctx.kv_shapes]
    compiled = CompiledModel(
        graph_module=gm,
        report=report,
        hf_config=config,
        kv_layouts=layouts,
        dtype=loaded.model.dtype,
        device=where,
        max_model_len=max_model_len,
        backend=backend,
        tokenizer=loaded.tokenizer,
        eos_token_ids=_eos_ids(loaded.generation_config, config),
        kv_cache_dtype=ctx.kv_cache_dtype,
    )
    compiled.generation_config = loaded.generation_config  # saved into artifacts as generation_config.json
    return compiled
