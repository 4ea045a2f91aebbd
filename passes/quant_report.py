"""The quantize pass's report: memory, the per-layer relative output error of the quantized linears on their
calibration activations, and the teacher-forced top-1 agreement of the quantized graph with the float one. It
lands in `PassContext.quantization`, which the compile report carries (`PassReport.quantization`)."""

from __future__ import annotations

import re
from typing import Any

import torch

from .quant_config import QuantConfig

_LAYER = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)[._]")

# What runs each mode's linears on CPU (backend "reference"), measured by bench/quantization.py: the report
# says so, so nobody picks a mode for speed that only saves memory here.
CPU_KERNELS = {
    "int8": "kiln's C loop over 16-channel int8 weight tiles at 1-16 rows (~4x fp32's GEMV time at batch 1), "
    "dequantize + float GEMM above",
    "w8a8": "kiln's AVX-512 VNNI kernel over 4x64 weight tiles at every batch size (~2.4x fp32 at batch 1)",
    "int4": "dequantize + float GEMM: no fast torch CPU kernel exists for it, so it is slower than fp32 here "
    "and saves memory only",
}


def layer_errors(errors: dict[str, float]) -> list[float]:
    """The worst linear's error per decoder layer, in layer order (linears named by their weight)."""
    layers: dict[int, float] = {}
    for name, err in errors.items():
        found = _LAYER.search("." + name)
        if found:
            layers[int(found.group(1))] = max(layers.get(int(found.group(1)), 0.0), err)
    return [layers[i] for i in sorted(layers)]


def quantization_report(
    cfg: QuantConfig,
    calibration_tokens: int,
    ref_logits: torch.Tensor,
    logits: torch.Tensor,
    weight_bytes: tuple[int, int],
    errors: dict[str, float],
) -> dict[str, Any]:
    """What the compile report says about a quantization (`PassReport.format` prints it)."""
    return {
        "mode": cfg.mode,
        "group_size": cfg.group_size if cfg.mode == "int4" else None,
        "zero_point": cfg.zero_point,
        "awq": cfg.awq,
        "smooth": cfg.smooth,
        "lm_head": cfg.lm_head,
        "kv_cache_dtype": cfg.kv_cache_dtype,
        "calibration_tokens": calibration_tokens,
        "top1_agreement": float((logits.argmax(-1) == ref_logits.argmax(-1)).float().mean()),
        "weight_bytes": list(weight_bytes),
        "layer_errors": layer_errors(errors),
        "linear_errors": errors,
        "prequantized": cfg.prequantized.describe() if cfg.prequantized is not None else None,
        "cpu_kernel": CPU_KERNELS.get(cfg.mode) if cfg.mode is not None else None,
    }
