"""The whole pass pipeline as one ordered list, in named stages (TensorRT-LLM AutoDeploy style), one flag per
optional pass. The list `build_pipeline` returns is exactly what `kiln.compile` runs: lowering and flattening
included. It lives in compiler/ rather than passes/ because the lowering passes live in codegen/, which itself
builds on passes/.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kiln.codegen.lower import LowerToReference, LowerToTriton
from kiln.passes.base import GraphPass
from kiln.passes.cleanup import Cleanup
from kiln.passes.flatten_attrs import FlattenAttributes
from kiln.passes.fuse_activation import FuseActivation
from kiln.passes.fuse_linears import FuseLinears
from kiln.passes.fuse_norm import FuseNorm
from kiln.passes.fuse_regions import FuseRegions
from kiln.passes.fuse_rope import FuseRope
from kiln.passes.paged_attention import PagedAttention
from kiln.passes.prune_logits import PruneLogits
from kiln.passes.quant_config import QuantConfig
from kiln.passes.quantize import Quantize
from kiln.passes.shard import ShardSpec, ShardTensorParallel


@dataclass(frozen=True)
class PipelineOptions:
    """What decides which passes run, besides the flags: the quantization asked for and the backend."""

    quant: QuantConfig | None
    backend: str
    shard: ShardSpec | None = None


@dataclass(frozen=True)
class Step:
    """One pass of the pipeline: its flag (None: part of the contract, always runs) and how to build it (None
    from `make`: not wanted for these options)."""

    flag: str | None
    make: Callable[[PipelineOptions], GraphPass | None]


def _final_cleanup(_: PipelineOptions) -> GraphPass:
    final = Cleanup()
    final.name = "final_cleanup"
    return final


def _quantize(opts: PipelineOptions) -> GraphPass | None:
    return Quantize(opts.quant) if opts.quant is not None and opts.quant.enabled else None


def _shard(opts: PipelineOptions) -> GraphPass | None:
    return ShardTensorParallel(opts.shard) if opts.shard is not None and opts.shard.size > 1 else None


def _lower(opts: PipelineOptions) -> GraphPass:
    return LowerToTriton() if opts.backend == "triton" else LowerToReference()


# Stages in the order they run. Within fusion, activation fusion matches the halves fuse_linears makes and region
# fusion takes whatever pointwise work the patterns leave; quantization runs after fusion so that fused q/k/v and
# gate/up matmuls are quantized as one weight each.
STAGES: tuple[tuple[str, tuple[Step, ...]], ...] = (
    ("cleanup", (Step("cleanup", lambda _: Cleanup()),)),
    ("attention", (Step(None, lambda _: PagedAttention()), Step("prune_logits", lambda _: PruneLogits()))),
    ("sharding", (Step(None, _shard),)),  # runs only under tensor parallelism: each rank's share, collectives
    (
        "fusion",
        (
            Step("fuse_linears", lambda _: FuseLinears()),
            Step("fuse_activation", lambda _: FuseActivation()),
            Step("fuse_norm", lambda _: FuseNorm()),
            Step("fuse_rope", lambda _: FuseRope()),
            Step("fuse_regions", lambda _: FuseRegions()),
        ),
    ),
    ("quantization", (Step("quantize", _quantize),)),  # runs only when a quantization or kv_cache_dtype is asked
    ("lowering", (Step(None, _final_cleanup), Step(None, _lower))),
    ("flatten", (Step(None, lambda _: FlattenAttributes()),)),
)

# Flags a user may turn off (all on by default); the paged-attention rewrite, the final cleanup, the lowering and
# flattening are the contract, not options.
PASS_FLAGS: dict[str, bool] = {step.flag: True for _, steps in STAGES for step in steps if step.flag is not None}


def pipeline_stages(
    options: dict[str, bool],
    quant: QuantConfig | None = None,
    backend: str = "reference",
    shard: ShardSpec | None = None,
) -> list[tuple[str, list[GraphPass]]]:
    """The passes to run for these flags, by stage; unknown flags are refused by name."""
    unknown = sorted(set(options) - set(PASS_FLAGS))
    if unknown:
        raise ValueError(f"unknown compile option(s): {', '.join(unknown)}; known: {', '.join(PASS_FLAGS)}")
    flags = {**PASS_FLAGS, **options}
    opts = PipelineOptions(quant, backend, shard)
    stages = []
    for stage, steps in STAGES:
        built = [step.make(opts) for step in steps if step.flag is None or flags[step.flag]]
        stages.append((stage, [p for p in built if p is not None]))
    return stages


def build_pipeline(
    options: dict[str, bool],
    quant: QuantConfig | None = None,
    backend: str = "reference",
    shard: ShardSpec | None = None,
) -> list[GraphPass]:
    """Every pass `kiln.compile` runs for these flags, in order, lowering for `backend` and flattening included."""
    return [p for _, passes in pipeline_stages(options, quant, backend, shard) for p in passes]
