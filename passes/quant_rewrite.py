"""The quantize pass's graph rewrite: one linear becomes a quantized `kiln::` op over packed weights (with its
AWQ / SmoothQuant input scale searched on the calibration activations), and attention reads a quantized cache."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import fx

from kiln.ops import quant as Q

from . import quant_calibrate as cal
from .fuse_common import arg_node, drop_attr, new_attr, param
from .quant_config import QuantConfig

if TYPE_CHECKING:
    from kiln.models.prequantized import PackedLinear

_OPS = {
    "int8": torch.ops.kiln.linear_int8.default,
    "w8a8": torch.ops.kiln.linear_w8a8.default,
    "int4": torch.ops.kiln.linear_int4.default,
}


def int4_forward(cfg: QuantConfig) -> cal.Forward:
    """What an int4 linear computes, for the AWQ scale search."""
    return lambda x, w: x @ Q.dequantize_int4(*Q.quantize_int4(w, cfg.group_size, cfg.zero_point), cfg.group_size)


def w8a8_forward(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What a W8A8 linear computes, for the SmoothQuant scale search."""
    q, s = Q.quantize_int8(w)
    xq, xs = Q.quantize_tokens(x)
    return (xq.double() @ q.double().t()).float() * xs[:, None] * s


def _input_scale(cfg: QuantConfig, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """The per-input-channel scale that lowers the output error on x (AWQ, SmoothQuant), if asked and found."""
    if cfg.awq:
        return cal.search_input_scale(x, w, int4_forward(cfg), cal.awq_candidates(x))[0]
    if cfg.smooth:
        return cal.search_input_scale(x, w, w8a8_forward, cal.smooth_candidates(x, w))[0]
    return None


def _quantized(cfg: QuantConfig, w: torch.Tensor, packed: PackedLinear | None) -> dict[str, torch.Tensor | None]:
    """The op's weight tensors, by name: the checkpoint's codes as they are, or `w` quantized here."""
    if packed is not None:
        return {
            k: None if t is None else t.to(w.device)
            for k, t in (("qweight", packed.qweight), ("scales", packed.scales), ("qzeros", packed.qzeros))
        }
    if cfg.mode == "int4":
        qweight, scales, qzeros = Q.quantize_int4(w, cfg.group_size, cfg.zero_point)
        return {"qweight": qweight, "scales": scales, "qzeros": qzeros}
    q, s = Q.quantize_int8(w)
    return {"qweight": q, "scales": s}


def rewrite_linear(
    gm: fx.GraphModule, node: fx.Node, x: torch.Tensor, cfg: QuantConfig, packed: PackedLinear | None
) -> tuple[int, float]:
    """Replace one linear; returns (bytes of the new tensors, relative output error on its activations x)."""
    assert cfg.mode is not None
    weight_node = arg_node(node, 1)
    weight = param(gm, weight_node)
    assert weight is not None
    w = weight.detach().float()
    bias = node.args[2] if len(node.args) > 2 else None
    scale = _input_scale(cfg, x, w)
    original = w
    if scale is not None:
        w = w * scale
    tensors = _quantized(cfg, w, packed)
    if cfg.mode != "int8":
        tensors["input_scale"] = None if scale is None else (1.0 / scale).contiguous()
    attrs = {
        k: None if t is None else new_attr(gm, f"{weight_node.target}_{k}", t, node, buffer=True)
        for k, t in tensors.items()
    }
    op = _OPS[cfg.mode]
    extra: tuple[int, ...] = (cfg.group_size,) if cfg.mode == "int4" else ()
    if packed is not None:
        extra = (packed.group_size,)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(op, (node.args[0], *attrs.values(), bias, *extra))
    new.meta = dict(node.meta)  # same output as the linear (its fake value, its layer's module stack)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    drop_attr(gm, weight_node)
    args = [x, *tensors.values(), None, *extra]
    error = cal.relative_error(op(*args).float(), x @ original.t())
    return sum(t.nbytes for t in tensors.values() if t is not None), error


def quantize_kv_cache(gm: fx.GraphModule) -> int:
    """Every paged attention reads and writes a quantized cache; returns how many."""
    count = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.kiln.paged_attention.default:
            node.target = torch.ops.kiln.paged_attention_quant.default
            count += 1
    return count
