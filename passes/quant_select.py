"""Which linears the quantize pass rewrites: a linear over a 2-D parameter whose K fits the mode, the LM head
only when asked; for a pre-quantized checkpoint (GPTQ / AWQ), exactly the linears it packed, with its weights."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import fx

from .base import is_op
from .fuse_common import arg_node, param
from .quant_config import QuantConfig

if TYPE_CHECKING:
    from kiln.models.prequantized import PackedLinear, Prequantized


def select_linears(gm: fx.GraphModule, cfg: QuantConfig, vocab: int) -> dict[fx.Node, PackedLinear | None]:
    """The linears to quantize, in graph order, each with the checkpoint's packed weight (None: quantize here)."""
    if not cfg.mode:
        return {}
    found: dict[fx.Node, PackedLinear | None] = {}
    for node in gm.graph.nodes:
        if not is_op(node, "linear"):
            continue
        w = param(gm, node.args[1])
        if cfg.prequantized is not None:
            packed = _from_checkpoint(cfg.prequantized, node) if w is not None else None
            if packed is not None:
                found[node] = packed
        elif _fits(cfg, w, vocab) and (cfg.lm_head or not node.meta.get("lm_head")):  # shard: a split head
            found[node] = None
    return found


def _fits(cfg: QuantConfig, w: torch.Tensor | None, vocab: int) -> bool:
    """A 2-D weight whose shape the mode takes; the LM head (N == vocab) only with `head`."""
    if w is None or w.dim() != 2 or (w.shape[0] == vocab and not cfg.lm_head):
        return False
    return cfg.mode != "int4" or (w.shape[1] % cfg.group_size == 0 and w.shape[0] % 8 == 0)


def _from_checkpoint(prequantized: Prequantized, node: fx.Node) -> PackedLinear | None:
    """The checkpoint's packed weight for a linear: one HF linear's, or several fused along N."""
    weight = arg_node(node, 1)
    targets = weight.meta.get("fused_from", [weight.target])  # set by fuse_linears
    # Graph attributes are the HF names under capture's wrapper module `model`.
    return prequantized.lookup([str(t).removeprefix("model.") for t in targets])
