"""The ordered pass pipeline, one flag per pass (TensorRT-LLM AutoDeploy style stages)."""
from __future__ import annotations

from .base import GraphPass
from .cleanup import Cleanup
from .fuse_activation import FuseActivation
from .fuse_linears import FuseLinears
from .fuse_norm import FuseNorm
from .fuse_regions import FuseRegions
from .fuse_rope import FuseRope
from .paged_attention import PagedAttention
from .prune_logits import PruneLogits
from .quantize import Quantize, QuantConfig

# Flags a user may turn off; the paged-attention rewrite and the final cleanup are the contract, not options.
PASS_FLAGS = {
    "cleanup": True,
    "prune_logits": True,
    "fuse_linears": True,
    "fuse_activation": True,
    "fuse_norm": True,
    "fuse_rope": True,
    "fuse_regions": True,
    "quantize": True,  # runs only when a quantization or kv_cache_dtype is asked for
}

# Fusions in the order they run: activation fusion matches the halves fuse_linears makes; region fusion takes
# whatever pointwise work the patterns leave.
_FUSIONS = [("fuse_linears", FuseLinears), ("fuse_activation", FuseActivation), ("fuse_norm", FuseNorm),
            ("fuse_rope", FuseRope), ("fuse_regions", FuseRegions)]


def build_pipeline(options: dict[str, bool], quant: QuantConfig | None = None) -> list[GraphPass]:
    """The passes to run for these flags; unknown flags are refused by name. Quantization runs after fusion."""
    unknown = sorted(set(options) - set(PASS_FLAGS))
    if unknown:
        raise ValueError(f"unknown compile option(s): {', '.join(unknown)}; known: {', '.join(PASS_FLAGS)}")
    flags = {**PASS_FLAGS, **options}
    passes: list[GraphPass] = []
    if flags["cleanup"]:
        passes.append(Cleanup())
    passes.append(PagedAttention())
    if flags["prune_logits"]:
        passes.append(PruneLogits())
    passes += [cls() for flag, cls in _FUSIONS if flags[flag]]
    if quant is not None and quant.enabled and flags["quantize"]:
        passes.append(Quantize(quant))
    final = Cleanup()
    final.name = "final_cleanup"
    passes.append(final)
    return passes
