"""What to quantize and how: the spec strings of `kiln.compile(quantization=..., kv_cache_dtype=...)`.

Modes: int8 (weight-only, per-output-channel symmetric), w8a8 (int8 weights and per-token dynamic int8
activations; `smooth` searches SmoothQuant scales), int4 (weight-only, group-wise g32/g64/g128, symmetric or
`zp`; `awq` searches activation-aware scales). `head` quantizes the LM head too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kiln.ops import quant as Q

if TYPE_CHECKING:
    from kiln.models.prequantized import Prequantized

MODES = ("int8", "w8a8", "int4")
GROUP_SIZES = (32, 64, 128)


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
    def parse(cls, spec: str | None, kv_cache_dtype: str | None = None) -> QuantConfig:
        """`int8`, `w8a8[:smooth]`, `int4[:g32|g64|g128][:zp][:awq]`, each optionally `:head`."""
        if kv_cache_dtype is not None and kv_cache_dtype not in Q.KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype: {kv_cache_dtype!r} is not one of {', '.join(Q.KV_CACHE_DTYPES)}")
        if not spec:
            return cls(kv_cache_dtype=kv_cache_dtype)
        mode, *opts = spec.split(":")
        if mode not in MODES:
            raise ValueError(f"quantization: {mode!r} is not one of {', '.join(MODES)}")
        fields: dict[str, Any] = {"mode": mode, "kv_cache_dtype": kv_cache_dtype}
        allowed = (
            {"head"}
            | ({"smooth"} if mode == "w8a8" else set())
            | ({"zp", "awq"} | {f"g{g}" for g in GROUP_SIZES} if mode == "int4" else set())
        )
        for opt in opts:
            if opt not in allowed:
                raise ValueError(
                    f"quantization: option {opt!r} does not apply to {mode}; known: {', '.join(sorted(allowed))}"
                )
            if opt.startswith("g"):
                fields["group_size"] = int(opt[1:])
            else:
                fields[{"head": "lm_head", "zp": "zero_point"}.get(opt, opt)] = True
        return cls(**fields)

    @property
    def enabled(self) -> bool:
        return self.mode is not None or self.kv_cache_dtype is not None
