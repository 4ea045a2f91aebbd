"""Quantization: linears become quantized `kiln::` ops over packed weights; attention may read a quantized cache.

Runs after fusion, so the fused q/k/v and gate/up matmuls are quantized as one weight each. Modes (spec
strings such as `"int4:g64:zp:awq"`, see QuantConfig.parse):
- int8: weight-only, per-output-channel symmetric; activations exact.
- w8a8: int8 weights, per-token dynamic int8 activations; `smooth` searches SmoothQuant scales.
- int4: weight-only, group-wise (g32/g64/g128), symmetric or `zp`; `awq` searches activation-aware scales.
Embeddings stay full precision, and so does the LM head unless `head` is given. The graph is run on
calibration tokens before and after: the per-layer relative output error of the quantized linears on their
calibration activations and the teacher-forced top-1 agreement land in ctx.state["quantization"], which the
compile report carries. A pre-quantized checkpoint (models/prequantized.py, GPTQ / AWQ) brings its own packed int4
weights: exactly the linears it packed are rewritten, with those weights, and nothing is quantized here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx

from kiln.ops import quant as Q

from . import quant_calibrate as cal
from .base import GraphPass, PassContext, is_op
from .fuse_common import drop_attr, new_attr, param

if TYPE_CHECKING:
    from kiln.models.prequantized import PackedLinear, Prequantized

MODES = ("int8", "w8a8", "int4")
GROUP_SIZES = (32, 64, 128)
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

@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how; `calibration` is token-id prompts (seeded random tokens when None)."""

    mode: str | None = None
    group_size: int = 128
    zero_point: bool = False
    awq: bool = False
    smooth: bool = False
    lm_head: bool = False
    kv_cache_dtype: str | None = None
    calibration: tuple[tuple[int, ...], ...] | None = None
    prequantized: Prequantized | None = field(default=None, compare=False, repr=False)  # the checkpoint's weights

    @classmethod
    def parse(cls, spec: str | None, kv_cache_dtype: str | None = None) -> "QuantConfig":
        """`int8`, `w8a8[:smooth]`, `int4[:g32|g64|g128][:zp][:awq]`, each optionally `:head`."""
        if kv_cache_dtype is not None and kv_cache_dtype not in Q.KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype: {kv_cache_dtype!r} is not one of {', '.join(Q.KV_CACHE_DTYPES)}")
        if not spec:
            return cls(kv_cache_dtype=kv_cache_dtype)
        mode, *opts = spec.split(":")
        if mode not in MODES:
            raise ValueError(f"quantization: {mode!r} is not one of {', '.join(MODES)}")
        fields: dict[str, Any] = {"mode": mode, "kv_cache_dtype": kv_cache_dtype}
        allowed = {"head"} | ({"smooth"} if mode == "w8a8" else set()) | (
            {"zp", "awq"} | {f"g{g}" for g in GROUP_SIZES} if mode == "int4" else set())
        for opt in opts:
            if opt not in allowed:
                raise ValueError(f"quantization: option {opt!r} does not apply to {mode}; known: {', '.join(sorted(allowed))}")
            if opt.startswith("g"):
                fields["group_size"] = int(opt[1:])
            else:
                fields[{"head": "lm_head", "zp": "zero_point"}.get(opt, opt)] = True
        return cls(**fields)

    @property
    def enabled(self) -> bool:
        return self.mode is not None or self.kv_cache_dtype is not None


def _int4_forward(cfg: QuantConfig) -> cal.Forward:
    return lambda x, w: x @ Q.dequantize_int4(*Q.quantize_int4(w, cfg.group_size, cfg.zero_point), cfg.group_size)


def _w8a8_forward(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    q, s = Q.quantize_int8(w)
    xq, xs = Q.quantize_tokens(x)
    return (xq.double() @ q.double().t()).float() * xs[:, None] * s


class Quantize(GraphPass):
    name = "quantize"

    def __init__(self, config: QuantConfig) -> None:
        self.config = config
        self._packed: dict[fx.Node, PackedLinear | None] = {}

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> dict[str, int]:
        cfg = self.config
        weights = [p for p in gm.parameters()]
        dtype = weights[0].dtype if weights else torch.float32
        vocab = int(ctx.config.vocab_size)
        prompts = [list(p) for p in cfg.calibration] if cfg.calibration else cal.calibration_tokens(vocab)
        linears = [n for n in gm.graph.nodes if self._quantizable(gm, n, vocab)] if cfg.mode else []
        ref_logits, inputs = cal.run_graph(gm, prompts, ctx.state["kv_shapes"], dtype, watch=set(linears))
        before = after = 0
        errors: dict[str, float] = {}
        for node in linears:
            name = node.args[1].target
            before += param(gm, node.args[1]).nbytes
            new_bytes, errors[name] = self._rewrite(gm, node, inputs.pop(node))
            after += new_bytes
        attentions = 0
        if cfg.kv_cache_dtype is not None:
            for node in gm.graph.nodes:
                if node.op == "call_function" and node.target is torch.ops.kiln.paged_attention.default:
                    node.target = torch.ops.kiln.paged_attention_quant.default
                    attentions += 1
            ctx.state["kv_cache_dtype"] = cfg.kv_cache_dtype
        gm.graph.lint()
        gm.recompile()
        cache_dtype = Q.KV_CACHE_DTYPES[cfg.kv_cache_dtype] if cfg.kv_cache_dtype else dtype
        logits, _ = cal.run_graph(gm, prompts, ctx.state["kv_shapes"], cache_dtype, Q.SCALE_BYTES if cfg.kv_cache_dtype else 0)
        layers: dict[int, float] = {}
        for name, err in errors.items():
            found = _LAYER.search("." + name)
            if found:
                layers[int(found.group(1))] = max(layers.get(int(found.group(1)), 0.0), err)
        ctx.state["quantization"] = {
            "mode": cfg.mode, "group_size": cfg.group_size if cfg.mode == "int4" else None,
            "zero_point": cfg.zero_point, "awq": cfg.awq, "smooth": cfg.smooth, "lm_head": cfg.lm_head,
            "kv_cache_dtype": cfg.kv_cache_dtype, "calibration_tokens": sum(len(p) for p in prompts),
            "top1_agreement": float((logits.argmax(-1) == ref_logits.argmax(-1)).float().mean()),
            "weight_bytes": [before, after], "layer_errors": [layers[i] for i in sorted(layers)],
            "linear_errors": errors,
            "prequantized": cfg.prequantized.describe() if cfg.prequantized is not None else None,
            "cpu_kernel": CPU_KERNELS.get(cfg.mode),
        }
        return {"linears": len(linears), "attentions": attentions, "weight_kib_before": before // 1024,
                "weight_kib_after": after // 1024}

    def _quantizable(self, gm: fx.GraphModule, node: fx.Node, vocab: int) -> bool:
        """A linear over a 2-D parameter whose K fits the mode; the LM head (N == vocab) only when asked."""
        if not is_op(node, "linear"):
            return False
        w = param(gm, node.args[1])
        if self.config.prequantized is not None:  # exactly the linears the checkpoint packed
            return w is not None and self._from_checkpoint(node) is not None
        if w is None or w.dim() != 2 or (w.shape[0] == vocab and not self.config.lm_head):
            return False
        return self.config.mode != "int4" or (w.shape[1] % self.config.group_size == 0 and w.shape[0] % 8 == 0)

    def _from_checkpoint(self, node: fx.Node) -> PackedLinear | None:
        """The checkpoint's packed weight for a linear: one HF linear's, or several fused along N."""
        if node not in self._packed:
            weight = node.args[1]
            targets = weight.meta.get("fused_from", [weight.target])  # set by fuse_linears
            # Graph attributes are the HF names under capture's wrapper module `model`.
            self._packed[node] = self.config.prequantized.lookup([t.removeprefix("model.") for t in targets])
        return self._packed[node]

    def _rewrite(self, gm: fx.GraphModule, node: fx.Node, x: torch.Tensor) -> tuple[int, float]:
        """Replace one linear; returns (bytes of the new tensors, relative output error on x)."""
        cfg, weight_node = self.config, node.args[1]
        w = param(gm, weight_node).detach().float()
        bias = node.args[2] if len(node.args) > 2 else None
        scale = None
        if cfg.awq:
            scale, _ = cal.search_input_scale(x, w, _int4_forward(cfg), cal.awq_candidates(x))
        elif cfg.smooth:
            scale, _ = cal.search_input_scale(x, w, _w8a8_forward, cal.smooth_candidates(x, w))
        original = w
        if scale is not None:
            w = w * scale
        packed = self._packed.pop(node, None)
        if packed is not None:  # pre-quantized: the checkpoint's codes, as they are
            tensors = {k: None if t is None else t.to(w.device)
                       for k, t in (("qweight", packed.qweight), ("scales", packed.scales), ("qzeros", packed.qzeros))}
        elif cfg.mode == "int4":
            qweight, scales, qzeros = Q.quantize_int4(w, cfg.group_size, cfg.zero_point)
            tensors = {"qweight": qweight, "scales": scales, "qzeros": qzeros}
        else:
            q, s = Q.quantize_int8(w)
            tensors = {"qweight": q, "scales": s}
        if cfg.mode != "int8":
            tensors["input_scale"] = None if scale is None else (1.0 / scale).contiguous()
        attrs = {k: None if t is None else new_attr(gm, f"{weight_node.target}_{k}", t, node, buffer=True)
                 for k, t in tensors.items()}
        op, extra = {"int8": (torch.ops.kiln.linear_int8.default, ()),
                     "w8a8": (torch.ops.kiln.linear_w8a8.default, ()),
                     "int4": (torch.ops.kiln.linear_int4.default, (cfg.group_size,))}[cfg.mode]
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
