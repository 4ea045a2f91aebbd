"""What every pass shares: the pass interface, op counting, and the report of what each pass changed."""

from __future__ import annotations

import abc
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, TypeGuard

import torch
from torch import fx

# Calls that only re-describe memory; they are not counted as ops of a layer.
VIEW_OPS = {
    "view",
    "_unsafe_view",
    "reshape",
    "transpose",
    "permute",
    "unsqueeze",
    "squeeze",
    "expand",
    "slice",
    "select",
    "getitem",
    "alias",
    "t",
    "contiguous",
    "split",
    "split_with_sizes",
    "chunk",
    "unflatten",
    "flatten",
}


def op_name(node: fx.Node) -> str:
    """A short, stable name for a call node: `aten.linear`, `kiln.paged_attention`, `getitem`."""
    target = node.target
    if node.op == "call_module":  # fused regions are submodules region_0, region_1, ...: count them as "region"
        return str(target).rstrip("0123456789").rstrip("_")
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._schema.name.split('::')[-1]}"
    if isinstance(target, torch._ops.OpOverloadPacket):
        return f"{target._qualified_op_name.replace('::', '.')}"
    lowered = _lowered_names().get(target) if callable(target) else None
    if lowered is not None:  # backend "reference" calls this function in place of the op: same name
        return lowered
    name = getattr(target, "__name__", str(target))
    if getattr(target, "__module__", "").startswith("kiln."):  # a Triton launcher of kiln op `name`
        return f"kiln.{name}"
    return name


@lru_cache(maxsize=1)
def _lowered_names() -> dict[Any, str]:
    from kiln.backends.cpu.lowering import reference_calls

    return {fn: f"{op.namespace}.{op._schema.name.split('::')[-1]}" for op, fn in reference_calls().items()}


def is_view(node: fx.Node) -> bool:
    return op_name(node).split(".")[-1] in VIEW_OPS


def op_counts(gm: fx.GraphModule) -> Counter:
    """How many times each op is called in the graph (views included; filter with is_view)."""
    return Counter(op_name(n) for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module"))


_LAYER = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)(?:\.|$)")


def layer_op_counts(gm: fx.GraphModule, num_layers: int) -> list[int]:
    """Compute ops (views excluded) of each decoder layer, attributed by the HF module that produced them.

    A node a pass created without a module stack (paged_attention) belongs to the latest layer among its inputs.
    """
    layer: dict[fx.Node, int] = {}
    counts = [0] * num_layers
    for n in gm.graph.nodes:
        stack = n.meta.get("nn_module_stack")
        if stack:
            found = _LAYER.search("." + str(list(stack.values())[-1][0]))
            index = int(found.group(1)) if found else None
        else:
            index = max((layer[i] for i in n.all_input_nodes if i in layer), default=None)
        if index is None:
            continue
        layer[n] = index
        if index < num_layers and n.op.startswith("call_") and not is_view(n):
            counts[index] += 1
    return counts


def is_op(node: object, *names: str) -> TypeGuard[fx.Node]:
    """Whether `node` is a call to one of the aten ops named (`"linear"`, `"softmax"`, ...)."""
    return isinstance(node, fx.Node) and node.op == "call_function" and op_name(node).split(".")[-1] in names


@dataclass
class PassContext:
    """Facts about the model that a pass may need beyond the graph itself, and what one pass leaves for later
    ones (each field names the pass that writes it)."""

    config: Any
    layer_windows: list[int]
    # paged_attention: (kv_heads, head_dim, v_head_dim) per layer, the shapes of the caches it adds as inputs
    kv_shapes: list[tuple[int, int, int]] = field(default_factory=list)
    logits_indices: fx.Node | None = None  # paged_attention: the graph input prune_logits gathers rows with
    quantization: dict[str, Any] = field(default_factory=dict)  # quantize: accuracy and memory, for the report
    kv_cache_dtype: str | None = None  # quantize: the quantized KV cache's dtype, when one was asked for
    sharding: dict[str, Any] = field(default_factory=dict)  # shard: what tensor parallelism split, for the report


@dataclass
class PassRecord:
    """What one pass did: its own counters plus the op counts around it."""

    name: str
    counters: dict[str, int]
    ops_before: int
    ops_after: int
    changed: dict[str, int]  # op name -> delta

    def line(self) -> str:
        counters = ", ".join(f"{k}={v}" for k, v in self.counters.items()) or "-"
        delta = ", ".join(f"{k} {v:+d}" for k, v in sorted(self.changed.items())) or "no op changes"
        return f"{self.name:<18} {counters:<40} ops {self.ops_before:>5} -> {self.ops_after:<5} ({delta})"


@dataclass
class PassReport:
    """The per-pass record of a compile, printed by `kiln compile --report`."""

    records: list[PassRecord] = field(default_factory=list)
    ops_initial: Counter = field(default_factory=Counter)
    ops_final: Counter = field(default_factory=Counter)
    num_layers: int = 0
    layer_ops: tuple[list[int], list[int]] = ([], [])  # compute ops per decoder layer, before and after
    quantization: dict[str, Any] = field(default_factory=dict)  # passes/quantize.py: accuracy and memory
    sharding: dict[str, Any] = field(default_factory=dict)  # passes/shard.py: what each rank holds

    def format(self) -> str:
        lines = ["pass               what it matched/removed/added              graph ops (all calls)"]
        lines += [r.line() for r in self.records]

        def compute(counts: dict[str, int]) -> int:
            return sum(v for k, v in counts.items() if k.split(".")[-1] not in VIEW_OPS)

        if self.num_layers:
            lines.append(
                f"compute ops (views excluded): {compute(self.ops_initial)} -> {compute(self.ops_final)} "
                f"over {self.num_layers} layers"
            )
            before, after = self.layer_ops
            lines.append(f"compute ops per decoder layer: {before} -> {after}")
        lines.append("final ops: " + ", ".join(f"{k} x{v}" for k, v in self.ops_final.most_common()))
        if self.sharding:
            s = self.sharding

            def kinds(counts: dict[str, int]) -> str:
                return ", ".join(f"{k} x{v}" for k, v in counts.items()) or "none"

            lines.append(
                f"tensor parallel over {s['size']} ranks: column-parallel {kinds(s['column'])}; row-parallel "
                f"{kinds(s['row'])}; replicated {kinds(s['replicated'])}; embedding and LM head split by "
                f"vocabulary; KV heads per rank {s['kv_heads_per_rank']}"
            )
        if self.quantization:
            q = self.quantization
            before, after = q["weight_bytes"]
            lines.append(
                f"quantization {q['mode']} (kv cache {q['kv_cache_dtype'] or 'model dtype'}): quantized "
                f"weights {before / 2**20:.1f} -> {after / 2**20:.1f} MiB, teacher-forced top-1 agreement "
                f"{q['top1_agreement']:.1%} over {q['calibration_tokens']} calibration tokens"
            )
            lines.append(
                "relative output error per layer (worst linear): " + ", ".join(f"{e:.4f}" for e in q["layer_errors"])
            )
            if q.get("cpu_kernel"):
                lines.append(f"on CPU (backend reference) {q['mode']} runs {q['cpu_kernel']}")
            if q.get("prequantized"):
                lines.append(
                    "weights pre-quantized in the checkpoint: "
                    + ", ".join(f"{k}={v}" for k, v in q["prequantized"].items())
                )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passes": [r.__dict__ for r in self.records],
            "ops_initial": dict(self.ops_initial),
            "ops_final": dict(self.ops_final),
            "num_layers": self.num_layers,
            "layer_ops": self.layer_ops,
            "quantization": self.quantization,
            "sharding": self.sharding,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PassReport:
        """The inverse of to_dict: how an ahead-of-time artifact carries its compile report."""
        return cls(
            records=[PassRecord(**record) for record in data["passes"]],
            ops_initial=Counter(data["ops_initial"]),
            ops_final=Counter(data["ops_final"]),
            num_layers=data["num_layers"],
            layer_ops=tuple(data.get("layer_ops", ([], []))),
            quantization=data.get("quantization", {}),
            sharding=data.get("sharding", {}),
        )


class GraphPass(abc.ABC):
    """A named rewrite of a GraphModule in place. `run` returns counters of what it matched and changed."""

    name: str = "pass"

    @abc.abstractmethod
    def run(self, gm: fx.GraphModule, ctx: PassContext) -> dict[str, int]:
        """Rewrite `gm` in place; return counters such as {"matched": 3, "removed": 12}."""


def run_passes(gm: fx.GraphModule, passes: list[GraphPass], ctx: PassContext, report: PassReport) -> None:
    """Run each pass in order, lint and recompile after each, and record its effect."""
    report.ops_initial = op_counts(gm)
    initial_layers = layer_op_counts(gm, report.num_layers)
    for p in passes:
        before = op_counts(gm)
        counters = p.run(gm, ctx)
        gm.graph.lint()
        gm.recompile()
        after = op_counts(gm)
        changed = {k: after[k] - before[k] for k in set(before) | set(after) if after[k] != before[k]}
        report.records.append(PassRecord(p.name, counters, sum(before.values()), sum(after.values()), changed))
    report.ops_final = op_counts(gm)
    report.layer_ops = (initial_layers, layer_op_counts(gm, report.num_layers))
