"""Pre-quantized HF checkpoints (GPTQ, AWQ gemm) loaded into kiln's own int4 layout, with no GPTQ/AWQ library.

transformers hands such configs to optimum / gptqmodel / autoawq. kiln does not need them: the model is built
from its config without the quantization_config, every packed linear gets its dequantized float weight (so that
capture and calibration see an ordinary model), and the packed codes, converted bit-exactly (no re-quantizing)
to the layout of `kiln::linear_int4` (ops/quant.py), go to passes/quantize.py, which uses them as they
are. What cannot be converted exactly is refused by name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor

from kiln.ops import quant as Q

from .weights import safetensors_files

if TYPE_CHECKING:
    from _typeshed import DataclassInstance
    from transformers import PretrainedConfig, PreTrainedModel

# The quantize pass's config (kiln.passes.quant_config.QuantConfig); named by a type variable, not imported, since
# passes/ builds on models/ and not the other way round.
QuantConfigT = TypeVar("QuantConfigT", bound="DataclassInstance")

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AWQ gemm: the nibble at shift 4 * i holds column AWQ_ORDER[i] of its 8
_AWQ_UNPACK = [AWQ_ORDER.index(c) for c in range(8)]  # column c sits at nibble _AWQ_UNPACK[c] (0,4,1,5,2,6,3,7)
_GPTQ_ZERO_OFFSET = {"gptq": 1, "gptq_v2": 0}  # GPTQ v1 stores zero - 1; v2 stores the zero itself
_PACKED = ("qweight", "qzeros", "scales", "g_idx")


@dataclass(frozen=True)
class PackedLinear:
    """One linear as `kiln::linear_int4` reads it: int32 qweight [K/8, N], fp32 scales [K/g, N], int32 qzeros
    [K/g, N/8] (None when every zero point is 8, the symmetric case)."""

    qweight: Tensor
    scales: Tensor
    qzeros: Tensor | None
    group_size: int

    def dequantize(self) -> Tensor:
        """fp32 Wᵀ [K, N], exactly what the op computes with."""
        return Q.dequantize_int4(self.qweight, self.scales, self.qzeros, self.group_size)


@dataclass
class Prequantized:
    """A checkpoint's quantization and its packed linears, keyed by HF weight name (`...q_proj.weight`)."""

    method: str
    bits: int
    group_size: int  # as the checkpoint states it (-1: one group over all of K)
    sym: bool
    checkpoint_format: str
    linears: dict[str, PackedLinear] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """What the compile report records."""
        return {
            "method": self.method,
            "bits": self.bits,
            "group_size": self.group_size,
            "sym": self.sym,
            "checkpoint_format": self.checkpoint_format,
            "linears": len(self.linears),
        }

    def summary(self) -> str:
        group = "per column" if self.group_size == -1 else f"group size {self.group_size}"
        return f"{self.method}, {self.bits}-bit, {group}, {'symmetric' if self.sym else 'asymmetric'}"

    def lookup(self, names: list[str]) -> PackedLinear | None:
        """One linear's packed weight, or several fused along N (fuse_linears' q/k/v, gate/up); None when any
        part stayed float in the checkpoint or the parts' group sizes differ (the linear then stays float)."""
        parts = []
        for name in names:
            part = self.linears.get(name)
            if part is None:
                return None
            parts.append(part)
        if not parts or len({p.group_size for p in parts}) != 1:
            return None
        if len(parts) == 1:
            return parts[0]
        zeros = None
        if any(p.qzeros is not None for p in parts):  # a symmetric part gets its implicit 8s written out
            zeros = torch.cat(
                [
                    p.qzeros
                    if p.qzeros is not None
                    else Q.pack_int4(torch.full(p.scales.shape, 8, dtype=torch.int32), dim=1)
                    for p in parts
                ],
                1,
            )
        return PackedLinear(
            torch.cat([p.qweight for p in parts], 1),
            torch.cat([p.scales for p in parts], 1),
            zeros,
            parts[0].group_size,
        )

    def quant_config(self, requested: QuantConfigT, spec: str | None) -> QuantConfigT:
        """The quantize pass's config: int4 from these weights; a scheme asked on top of them is refused."""
        if spec:
            raise ValueError(
                f"quantization: {spec!r} cannot apply: the checkpoint is already quantized "
                f"({self.summary()}); leave quantization unset"
            )
        return dataclasses.replace(
            requested, mode="int4", group_size=self.group_size, zero_point=not self.sym, prequantized=self
        )


def parse_config(qc: dict[str, Any]) -> Prequantized:
    """Validate a config.json `quantization_config`; everything kiln cannot load exactly is a ValueError."""
    method = str(qc.get("quant_method", "")).lower()
    bits = qc.get("bits", qc.get("w_bit"))
    group = int(qc.get("group_size", qc.get("q_group_size", -1)))
    where = "quantization_config"
    if method not in ("gptq", "awq"):
        raise ValueError(
            f"{where}: quant_method {method!r} is not supported; kiln loads gptq and awq (gemm) 4-bit checkpoints"
        )
    if bits != 4:
        raise ValueError(f"{where}: {method} with bits={bits} is not supported; only 4-bit checkpoints load")
    if group != -1 and (group < 8 or group % 8):
        raise ValueError(f"{where}: group_size {group} is not supported (a multiple of 8, or -1)")
    if qc.get("dynamic"):
        raise ValueError(f"{where}: per-module 'dynamic' overrides are not supported")
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"{where}: awq version {version!r} is not supported; only 'gemm' loads")
        if not qc.get("zero_point", True):
            raise ValueError(f"{where}: awq with zero_point=false is not supported")
        return Prequantized("awq", 4, group, sym=False, checkpoint_format="gemm")
    fmt = str(qc.get("checkpoint_format", qc.get("format", "gptq"))).lower()
    if fmt not in _GPTQ_ZERO_OFFSET:
        raise ValueError(
            f"{where}: gptq checkpoint_format {fmt!r} is not supported (exllama/marlin/bitblas "
            "repacks are not); use gptq or gptq_v2"
        )
    return Prequantized("gptq", 4, group, sym=bool(qc.get("sym", True)), checkpoint_format=fmt)


def _group(pre: Prequantized, k: int, groups: int, name: str) -> int:
    """The group size along K (-1, or a size past K, is one group over K); partial groups are refused."""
    g = k if pre.group_size == -1 or pre.group_size >= k else pre.group_size
    if k % g or groups != k // g:
        raise ValueError(f"{name}: K={k} with group size {pre.group_size} and {groups} scale rows is not supported")
    return g


def _zeros(zeros: Tensor, name: str) -> Tensor | None:
    """Zero points [G, N] -> kiln's packed qzeros; None when all are 8 (kiln's symmetric form)."""
    if int(zeros.min()) < 0 or int(zeros.max()) > 15:
        raise ValueError(f"{name}: zero points outside 0..15 (GPTQ v1 zero 16) are not supported")
    return None if bool((zeros == 8).all()) else Q.pack_int4(zeros, dim=1).contiguous()


def _unpack_awq(words: Tensor) -> Tensor:
    """int32 [R, C/8] in AWQ's interleaved order -> codes [R, C] in column order."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    nibbles = (words.unsqueeze(-1) >> shifts) & 0xF  # [R, C/8, 8], by nibble position
    return nibbles[..., _AWQ_UNPACK].reshape(words.shape[0], -1)


def convert(pre: Prequantized, t: dict[str, Tensor], prefix: str) -> PackedLinear:
    """One linear's checkpoint tensors (`prefix` + qweight/qzeros/scales[/g_idx]) -> kiln's layout, bit-exact."""
    name = prefix.rstrip(".")
    try:
        qweight, qzeros, scales = (t[prefix + s] for s in ("qweight", "qzeros", "scales"))
    except KeyError as missing:
        raise ValueError(f"{name}: {pre.method} linear has no {missing.args[0]} tensor") from None
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise ValueError(f"{name}: qweight/qzeros must be int32, got {qweight.dtype}/{qzeros.dtype}")
    if pre.method == "gptq":  # qweight [K/8, N]: kiln's own layout already
        k, n = qweight.shape[0] * 8, qweight.shape[1]
        codes_t, zeros = qweight, Q.unpack_int4(qzeros, dim=1) + _GPTQ_ZERO_OFFSET[pre.checkpoint_format]
    else:  # awq gemm: qweight [K, N/8] packed along N, interleaved
        k, n = qweight.shape[0], qweight.shape[1] * 8
        codes_t, zeros = Q.pack_int4(_unpack_awq(qweight), dim=0), _unpack_awq(qzeros)
    g = _group(pre, k, scales.shape[0], name)
    if scales.shape != (k // g, n) or zeros.shape != (k // g, n) or k % 8:
        raise ValueError(
            f"{name}: shapes qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, scales "
            f"{tuple(scales.shape)} do not fit {pre.method} with group size {pre.group_size}"
        )
    g_idx = t.get(prefix + "g_idx")
    if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(k) // g):
        raise ValueError(
            f"{name}: act-order (desc_act) g_idx permutes the groups; only a trivial g_idx "
            "(k // group_size) is supported"
        )
    return PackedLinear(codes_t.contiguous(), scales.float().contiguous(), _zeros(zeros, name), g)


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    files = safetensors_files(path)
    if not files:
        raise ValueError(f"model: {path} is pre-quantized but has no safetensors weights (.bin is not read)")
    return {k: v for f in files for k, v in load_file(str(f)).items()}


def load_prequantized(
    path: Path, config: PretrainedConfig, dtype: torch.dtype, attn_implementation: str
) -> tuple[PreTrainedModel, Prequantized]:
    """The model with dequantized float linears, and the packed weights for the quantize pass."""
    from transformers import AutoModelForCausalLM

    qc = config.quantization_config
    pre = parse_config(qc if isinstance(qc, dict) else qc.to_dict())
    tensors = _read_safetensors(path)
    for key in [k for k in tensors if k.endswith(".qweight")]:
        prefix = key[: -len("qweight")]
        packed = convert(pre, tensors, prefix)
        for suffix in _PACKED:
            tensors.pop(prefix + suffix, None)
        tensors[prefix + "weight"] = packed.dequantize().t().to(dtype).contiguous()
        pre.linears[prefix + "weight"] = packed
    if not pre.linears:
        raise ValueError(f"model: {path} declares {pre.method} quantization but holds no qweight tensors")
    del config.quantization_config  # what transformers would hand to optimum / autoawq
    model_class: Any = AutoModelForCausalLM._model_mapping.get(type(config), None)
    if model_class is None:
        raise ValueError(f"model: {path}: pre-quantized {type(config).__name__} models are not supported")
    model, info = model_class.from_pretrained(
        None,
        config=config,
        state_dict=tensors,
        dtype=dtype,
        attn_implementation=attn_implementation,
        output_loading_info=True,
    )
    # Old GPTQ exporters wrote all-zero biases for linears that have none: those are harmless, nothing else is.
    unexpected = [
        k
        for k in info["unexpected_keys"]
        if not (
            k.endswith(".bias")
            and k[: -len("bias")] + "weight" in pre.linears
            and k in tensors
            and not tensors[k].any()
        )
    ]
    if info["missing_keys"] or unexpected:
        raise ValueError(
            f"model: {path}: after converting {pre.method}, tensors missing "
            f"{sorted(info['missing_keys'])}, unexpected {sorted(unexpected)}"
        )
    return model.eval(), pre
