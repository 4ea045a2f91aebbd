"""`kiln.compile` and `kiln.load`: HF model in, CompiledModel out."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import kiln.ops  # noqa: F401  (declares the kiln:: ops)

from .compile_shard import compile_shard
from .compiled import CompiledModel
from .export import artifact
from .export.manifest import is_artifact

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def compile(
    model: str | Path | PreTrainedModel,
    *,
    backend: str = "auto",
    dtype: str | torch.dtype | None = None,
    max_model_len: int | None = None,
    trust_remote_code: bool = False,
    quantization: str | None = None,
    kv_cache_dtype: str | None = None,
    device: str | torch.device | None = "auto",
    trusted_key: str | Path | None = None,
    tensor_parallel_size: int = 1,
    **options: bool,
) -> CompiledModel:
    """Capture `model` (a local HF directory or a PreTrainedModel), run the pass pipeline, return the engine.

    device: "auto" (the first CUDA GPU when there is one, else the CPU; a PreTrainedModel stays where it is),
    "cpu", "cuda" or "cuda:N". Weights load straight onto it; capture itself never depends on it.
    backend "auto" follows the device: "triton" on a GPU, "reference" on the CPU.

    quantization: "int8", "w8a8[:smooth]" or "int4[:g32|g64|g128][:zp][:awq]" (each may add ":head");
    kv_cache_dtype: "int8" or "fp8_e4m3". See `kiln.passes.quant_config`.
    options: one flag per optional pass (e.g. `prune_logits=False`); see `kiln.compiler.pipeline.PASS_FLAGS`.
    trusted_key: for an artifact, a PEM ed25519 public key that must have signed it (`kiln compile --sign-key`).
    tensor_parallel_size: ranks to split the model over (`passes/shard.py`), one process each; this process is
    rank 0 and returns a `TensorParallelModel` that drives the others (call its `shutdown` when done).
    """
    if isinstance(tensor_parallel_size, bool) or not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size: {tensor_parallel_size!r} is not a positive integer")
    if isinstance(model, (str, Path)) and is_artifact(model) and tensor_parallel_size == 1:  # nothing to capture
        fixed: dict[str, Any] = {
            k: v for k, v in (("quantization", quantization), ("kv_cache_dtype", kv_cache_dtype)) if v
        }
        fixed.update(options)
        return artifact.load(
            model,
            backend=backend,
            dtype=dtype,
            max_model_len=max_model_len,
            trust_remote_code=trust_remote_code,
            device=device,
            trusted_key=trusted_key,
            **fixed,
        )
    settings: dict[str, Any] = dict(
        backend=backend, dtype=dtype, max_model_len=max_model_len, trust_remote_code=trust_remote_code, device=device
    )
    settings.update(quantization=quantization, kv_cache_dtype=kv_cache_dtype, **options)
    if trusted_key is not None:
        raise ValueError(f"trusted_key: {model} is not a kiln artifact; only artifacts carry signatures")
    if tensor_parallel_size == 1:
        return compile_shard(model, None, **settings)
    if not isinstance(model, (str, Path)) or is_artifact(model):
        raise ValueError(
            "tensor_parallel_size: each rank compiles its own share from a checkpoint directory; pass its path "
            "(not a loaded model or an artifact)"
        )
    from .tensor_parallel import compile_parallel

    return compile_parallel(model, tensor_parallel_size, settings)


def load(path: str | Path, **kwargs: Any) -> CompiledModel:
    """Load a model for serving: an artifact from `kiln compile -o` starts without tracing or passes;
    an HF checkpoint directory is compiled."""
    return compile(path, **kwargs)
