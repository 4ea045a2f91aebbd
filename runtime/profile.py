"""`kiln profile MODEL`: where one decode step and one prefill step spend their time, op by op, against the
device's own measured ceilings (a roofline).

Each op of the final graph is timed as it runs (an `fx.Interpreter` over the real step: the paged KV cache, the
attention metadata, the lowered kernels; the GPU synchronised around each op), and its bytes moved and FLOPs are
counted from the shapes it sees: a linear moves its weight, input and output and does 2·M·N·K FLOPs; the paged
attention reads the KV each sequence actually holds; a gather (embedding, index_select) its rows; any other op
moves its inputs and outputs; views move nothing. Achieved GB/s and TFLOP/s are set against a device-to-device
copy's bandwidth and a large matmul's rate, both measured at start in the model's dtype. Timing each op alone adds
a little per op (the interpreter, and on a GPU the synchronisations), so the per-op sum differs from the step's
own time, which is printed beside it.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx

from kiln.ops.metadata import AttentionMetadata, step_context
from kiln.passes.base import is_view, op_name

BLOCK = 16


@dataclass
class Ceilings:
    """The device's measured limits: copy bandwidth (bytes read + written per second) and matmul FLOP/s."""

    device: str
    bandwidth: float
    flops: float


@dataclass
class OpRow:
    name: str
    calls: int = 0
    seconds: float = 0.0
    bytes: float = 0.0
    flops: float = 0.0


@dataclass
class StepProfile:
    """One step's ops, the step's own time (median of plain runs), and what the step was."""

    phase: str
    shape: str
    step_seconds: float
    rows: list[OpRow] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(fn: Any, device: torch.device, repeats: int, best: bool = False) -> float:
    """Median time of `repeats` runs after a warm-up (the best one when measuring a ceiling)."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times) if best else statistics.median(times)


def measure_ceilings(device: torch.device, dtype: torch.dtype) -> Ceilings:
    """The best of five large copies and large matmuls on `device` in `dtype` (sizes a CPU does in a fraction of a
    second each)."""
    gpu = device.type == "cuda"
    elems = (256 if gpu else 64) * 2**20 // torch.empty((), dtype=dtype).element_size()
    src = torch.empty(elems, dtype=dtype, device=device).normal_()
    dst = torch.empty_like(src)
    copy_s = _seconds(lambda: dst.copy_(src), device, 5, best=True)
    n = 8192 if gpu else 2048
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    mm_s = _seconds(lambda: a @ b, device, 5, best=True)
    name = torch.cuda.get_device_name(device) if gpu else "cpu"
    return Ceilings(name, 2 * src.nbytes / copy_s, 2 * n**3 / mm_s)


def _tensors(args: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    fx.node.map_aggregate(args, lambda a: found.append(a) if isinstance(a, torch.Tensor) else None)
    return found


def _cost(node: fx.Node, args: tuple, out: Any) -> tuple[float, float]:
    """(bytes moved, FLOPs) of one call, from the tensors it received and returned."""
    name = op_name(node).split(".")[-1]
    if is_view(node) or name == "sym_size":
        return 0.0, 0.0
    outs = _tensors(out)
    out_bytes = sum(t.nbytes for t in outs)
    if name in ("embedding", "index_select"):  # reads only the rows it gathers
        index = args[1] if name == "embedding" else args[2]
        return float(index.nbytes + 2 * out_bytes), 0.0
    if name.startswith("paged_attention"):
        q, k, v, k_cache, v_cache, _, _, seq_lens, starts = args[:9]
        lens, bounds = seq_lens.tolist(), starts.tolist()
        per_token = k_cache.shape[2] * (k_cache.shape[3] + v_cache.shape[3]) * k_cache.element_size()
        read = sum(lens) * per_token
        pairs = sum((s - (e - b)) * (e - b) + (e - b) * (e - b + 1) // 2 for s, b, e in zip(lens, bounds, bounds[1:]))
        flops = 2 * pairs * q.shape[1] * (q.shape[2] + v.shape[2])
        return float(read + q.nbytes + k.nbytes + v.nbytes + out_bytes), float(flops)
    ins = _tensors(args)
    moved = float(sum(t.nbytes for t in ins) + out_bytes)
    if "linear" in name or name in ("mm", "addmm", "bmm", "matmul"):
        x = args[1] if name == "addmm" else args[0]
        return moved, float(2 * sum(t.numel() for t in outs) * x.shape[-1])
    return moved, float(sum(t.numel() for t in outs))


class _OpTimer(fx.Interpreter):
    """Runs the graph, timing and costing every call node, grouped by op name."""

    def __init__(self, gm: fx.GraphModule, device: torch.device) -> None:
        super().__init__(gm)
        self.device = device
        self.rows: dict[str, OpRow] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n.op not in ("call_function", "call_method", "call_module"):
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        _sync(self.device)
        start = time.perf_counter()
        out = getattr(self, n.op)(n.target, args, kwargs)
        _sync(self.device)
        elapsed = time.perf_counter() - start
        row = self.rows.setdefault(op_name(n), OpRow(op_name(n)))
        moved, flops = _cost(n, args, out)
        row.calls, row.seconds, row.bytes, row.flops = (
            row.calls + 1,
            row.seconds + elapsed,
            row.bytes + moved,
            row.flops + flops,
        )
        return out


def profile_step(compiled: Any, phase: str, batch: int, new_tokens: int, context: int, repeats: int = 5) -> StepProfile:
    """Time one step of `batch` sequences that each add `new_tokens` after `context` cached ones."""
    device = compiled.device
    per_seq = -(-(context + new_tokens) // BLOCK)
    tables = [[s * per_seq + b for b in range(per_seq)] for s in range(batch)]
    caches = compiled.allocate_kv_cache(batch * per_seq, BLOCK)
    meta = AttentionMetadata.build([new_tokens] * batch, [context] * batch, tables, BLOCK, device)
    ids = torch.randint(4, compiled.vocab_size, (batch * new_tokens,), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    positions = torch.arange(context, context + new_tokens, device=device).repeat(batch)
    inputs = (ids, positions, *meta.graph_inputs(), *caches)
    step_s = _seconds(lambda: compiled(ids, positions, meta, caches), device, repeats)
    timer = _OpTimer(compiled.graph_module, device)
    with torch.inference_mode(), step_context(meta):
        timer.run(*inputs)  # warm: first calls compile kernels
        timer.rows.clear()
        timer.run(*inputs)
    shape = f"batch {batch} x {new_tokens} new token(s) after {context} cached"
    rows = sorted(timer.rows.values(), key=lambda r: -r.seconds)
    return StepProfile(phase, shape, step_s, rows)


def format_table(step: StepProfile, ceilings: Ceilings) -> str:
    """One line per op kind: calls, time and share of the ops' total, achieved rates and their roofline fraction."""
    total = sum(r.seconds for r in step.rows) or 1.0
    ridge = ceilings.flops / ceilings.bandwidth  # FLOPs per byte where the two ceilings meet
    lines = [
        f"{step.phase}: {step.shape}; step {step.step_seconds * 1e3:.3f} ms (plain run), ops timed one by one "
        f"{total * 1e3:.3f} ms",
        f"{'op':<30} {'calls':>5} {'ms':>9} {'%':>6} {'GB/s':>9} {'TFLOP/s':>8} {'%BW':>6} {'%FLOP':>6} bound",
    ]
    for r in step.rows:
        gbs = r.bytes / r.seconds / 1e9 if r.seconds else 0.0
        tflops = r.flops / r.seconds / 1e12 if r.seconds else 0.0
        bound = "-" if not r.bytes else ("compute" if r.flops / r.bytes > ridge else "memory")
        lines.append(
            f"{r.name:<30} {r.calls:>5} {r.seconds * 1e3:>9.3f} {100 * r.seconds / total:>6.1f} {gbs:>9.2f} "
            f"{tflops:>8.4f} {100 * gbs * 1e9 / ceilings.bandwidth:>6.1f} {100 * tflops * 1e12 / ceilings.flops:>6.1f} "
            f"{bound}"
        )
    return "\n".join(lines)


def roofline_png(steps: list[StepProfile], ceilings: Ceilings, path: str | Path) -> None:
    """Each op kind as a point (arithmetic intensity, achieved FLOP/s) under the device's two measured ceilings."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ValueError("--png needs matplotlib: pip install 'kiln[profile]'") from err
    fig, ax = plt.subplots(figsize=(8, 5.5))
    points = [(s, r) for s in steps for r in s.rows if r.bytes and r.flops and r.seconds]
    lo = min([r.flops / r.bytes for _, r in points] + [0.05]) / 2
    hi = max([r.flops / r.bytes for _, r in points] + [4 * ceilings.flops / ceilings.bandwidth]) * 2
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    ax.plot(xs, [min(ceilings.bandwidth * x, ceilings.flops) for x in xs], "k-", label="measured ceilings")
    for marker, phase in zip("os^", sorted({s.phase for s in steps})):
        mine = [r for s, r in points if s.phase == phase]
        ax.scatter([r.flops / r.bytes for r in mine], [r.flops / r.seconds for r in mine], marker=marker, label=phase)
        for r in mine:
            ax.annotate(r.name.split(".")[-1], (r.flops / r.bytes, r.flops / r.seconds), fontsize=7)
    ax.set(xscale="log", yscale="log", xlabel="FLOPs per byte moved", ylabel="achieved FLOP/s")
    ax.set_title(f"kiln profile on {ceilings.device}: copy {ceilings.bandwidth / 1e9:.1f} GB/s, "
                 f"matmul {ceilings.flops / 1e12:.2f} TFLOP/s")  # fmt: skip
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def run(
    compiled: Any,
    batch: int = 8,
    prompt_len: int = 128,
    context: int = 512,
    png: str | Path | None = None,
    json_path: str | Path | None = None,
) -> str:
    """Profile a decode step (`batch` sequences, `context` cached tokens each) and a prefill step (`batch` x
    `prompt_len` tokens); returns the tables, and writes the roofline PNG and a JSON record when asked."""
    for name, value in (("batch", batch), ("prompt_len", prompt_len), ("context", context)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "context" else 1):
            raise ValueError(f"{name}: {value!r} is not a valid count")
    if context + 1 > compiled.max_model_len or prompt_len > compiled.max_model_len:
        raise ValueError(
            f"context: {context} (+1) or prompt_len {prompt_len} exceeds max_model_len {compiled.max_model_len}"
        )
    ceilings = measure_ceilings(compiled.device, compiled.dtype)
    steps = [
        profile_step(compiled, "decode", batch, 1, context),
        profile_step(compiled, "prefill", batch, prompt_len, 0),
    ]
    text = "\n\n".join(
        [
            f"device {ceilings.device}: copy {ceilings.bandwidth / 1e9:.1f} GB/s, matmul "
            f"{ceilings.flops / 1e12:.3f} TFLOP/s ({compiled.dtype}, measured now)"
        ]  # fmt: skip
        + [format_table(step, ceilings) for step in steps]
    )
    if png is not None:
        roofline_png(steps, ceilings, png)
    if json_path is not None:
        Path(json_path).write_text(
            json.dumps({"ceilings": asdict(ceilings), "steps": [asdict(s) for s in steps]}, indent=1)
        )
    return text
