"""Quantization: linears become quantized `kiln::` ops over packed weights; attention may read a quantized cache.

Runs after fusion, so the fused q/k/v and gate/up matmuls are quantized as one weight each. The pass composes
four steps, one file each: which linears (quant_select), a calibration run of the float graph that records what
they read (quant_calibrate), the rewrite (quant_rewrite), and a second calibration run of the quantized graph
for the report (quant_report). Modes and spec strings: quant_config. Embeddings stay full precision, and so does
the LM head unless `head` is given. A pre-quantized checkpoint (models/prequantized.py, GPTQ / AWQ) brings its own
packed int4 weights: exactly the linears it packed are rewritten, with those weights, and nothing is quantized here.
"""

from __future__ import annotations

import torch
from torch import fx

from kiln.ops import quant as Q

from . import quant_calibrate as cal
from .base import GraphPass, PassContext
from .fuse_common import arg_node, param
from .quant_config import QuantConfig
from .quant_report import quantization_report
from .quant_rewrite import quantize_kv_cache, rewrite_linear
from .quant_select import select_linears


class Quantize(GraphPass):
    name = "quantize"

    def __init__(self, config: QuantConfig) -> None:
        self.config = config

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> dict[str, int]:
        cfg = self.config
        weights = [p for p in gm.parameters()]
        dtype = weights[0].dtype if weights else torch.float32
        vocab = int(ctx.config.vocab_size)
        prompts = [list(p) for p in cfg.calibration] if cfg.calibration else cal.calibration_tokens(vocab)
        linears = select_linears(gm, cfg, vocab)
        ref_logits, inputs = cal.run_graph(gm, prompts, ctx.kv_shapes, dtype, watch=set(linears))
        before = after = 0
        errors: dict[str, float] = {}
        for node, packed in linears.items():
            weight = arg_node(node, 1)
            tensor = param(gm, weight)
            assert tensor is not None
            before += tensor.nbytes
            new_bytes, errors[str(weight.target)] = rewrite_linear(gm, node, inputs.pop(node), cfg, packed)
            after += new_bytes
        attentions = 0
        if cfg.kv_cache_dtype is not None:
            attentions = quantize_kv_cache(gm)
            ctx.kv_cache_dtype = cfg.kv_cache_dtype
        gm.graph.lint()
        gm.recompile()
        cache_dtype = Q.KV_CACHE_DTYPES[cfg.kv_cache_dtype] if cfg.kv_cache_dtype else dtype
        extra = Q.SCALE_BYTES if cfg.kv_cache_dtype else 0
        logits, _ = cal.run_graph(gm, prompts, ctx.kv_shapes, cache_dtype, extra)
        tokens = sum(len(p) for p in prompts)
        ctx.quantization = quantization_report(cfg, tokens, ref_logits, logits, (before, after), errors)
        return {
            "linears": len(linears),
            "attentions": attentions,
            "weight_kib_before": before // 1024,
            "weight_kib_after": after // 1024,
        }
