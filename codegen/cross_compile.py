"""Compile the kernels a model's launchers pick, at the model's real sizes, for an NVIDIA target with no GPU.

Each step's launches are planned the way the launchers plan them: the plans' `choose` functions, given
the target's shared-memory limit and SM count, on `meta` tensors of the step's shapes (decode at batch 1 and
256, prefill of 512-token and 2048-token sequences), the quantized linears included when asked. So what is
compiled here is what a GPU of that
capability would run, not a candidate that happens to compile. Each distinct kernel (source, constants,
signature, options) is compiled once and recorded: its shared memory against the target's limit and against
its config's bound (which `pick` trusts), registers and spills; its source and cubin go under out_dir/sm_<cc>/.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .kernel_plan import SIZING_SMS, Launch, Target
from .kernels import (
    cache_write_plan,
    gated_act_plan,
    matmul_plan,
    paged_attention_plan,
    pointwise_plan,
    quant_matmul_plan,
    rms_norm_plan,
    rope_plan,
)
from .render import interpreting

# Per capability: usable shared memory per block (opt-in maximum) and the SM count of a representative part
# (H100 SXM, A100, L4, A10), which only sizes the decode split.
TARGETS = {90: Target(232_448, SIZING_SMS), 80: Target(166_912, 108), 89: Target(101_376, 58),
           86: Target(101_376, 72)}
QUANT_GROUP_SIZE = 128  # int4's group size at which the quantized linears are compiled
# Steps as (name, sequences, query length of each): decode at two batch sizes, prefill at two prompt lengths.
STEPS = (("decode_1", 1, 1), ("decode_256", 256, 1), ("prefill_512", 4, 512), ("prefill_2048", 1, 2048))
MAX_BLOCKS_PER_SEQ = 512  # block-table width: only a stride, the kernels take any


@dataclass
class KernelRecord:
    """One distinct kernel as compiled for one target, and the steps that launch it."""

    name: str
    label: str
    target: str
    steps: list[str]
    config: dict[str, Any]
    num_warps: int
    num_stages: int
    shared_bytes: int
    shared_bound: int | None  # the config's bound that `pick` trusted; None for kernels without a choice
    registers: int
    spill_bytes: int
    shared_limit: int
    source: str = ""
    cubin: str = ""

    def problems(self) -> list[str]:
        """Why this kernel would fail or slow down on the target; empty when it fits."""
        out = []
        if self.shared_bytes > self.shared_limit:
            out.append(f"{self.shared_bytes} bytes of shared memory > the limit {self.shared_limit}")
        if self.shared_bound is not None and self.shared_bytes > self.shared_bound:
            out.append(f"{self.shared_bytes} bytes of shared memory > its config's bound {self.shared_bound}")
        if self.spill_bytes:
            out.append(f"{self.spill_bytes} bytes of register spills")
        return [f"{self.name} {self.config} warps={self.num_warps} stages={self.num_stages}: {p}" for p in out]


@dataclass(frozen=True)
class ModelShapes:
    """The sizes kernels are specialised and sized for, read from an HF config."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    rotary_dim: int
    act: str
    weight_offset: float
    window: int
    softcap: float
    max_positions: int

    @classmethod
    def from_config(cls, config: Any) -> ModelShapes:
        def get(key: str, default: Any = None) -> Any:
            return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)

        heads = get("num_attention_heads")
        head_dim = get("head_dim") or get("hidden_size") // heads
        act = {"silu": "silu", "gelu": "gelu"}.get(get("hidden_act", "silu"), "gelu_tanh")
        model_type = get("model_type", "")
        return cls(get("hidden_size"), heads, get("num_key_value_heads") or heads, head_dim,
                   get("intermediate_size"), int(head_dim * (get("partial_rotary_factor") or 1.0)), act,
                   1.0 if str(model_type).startswith("gemma") else 0.0, int(get("sliding_window") or 0),
                   float(get("attn_logit_softcapping") or 0.0), min(int(get("max_position_embeddings", 4096)), 1 << 20))


@dataclass
class Planned:
    """One launch of one step, with the bound of the config it was chosen by (None: no choice made)."""

    kernel: str
    step: str
    launch: Launch
    shared_bound: int | None = None


def _meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def step_launches(shapes: ModelShapes, dtype: torch.dtype, target: Target, step: str, seqs: int, query_len: int,
                  block_size: int = 16, quantized: bool = False) -> list[Planned]:
    """Every kernel one step of the model runs, planned as the launchers plan them for `target`; with
    `quantized`, the quantized linears too (`quant_step_launches`)."""
    s, t = shapes, seqs * query_len
    x, w = _meta(t, s.hidden, dtype=dtype), _meta(s.hidden, dtype=dtype)
    q, k = _meta(t, s.heads, s.head_dim, dtype=dtype), _meta(t, s.kv_heads, s.head_dim, dtype=dtype)
    k_cache, v_cache = (_meta(4096, block_size, s.kv_heads, s.head_dim, dtype=dtype) for _ in range(2))
    cos_sin = _meta(s.max_positions, s.rotary_dim, dtype=torch.float32)
    add_mul = pointwise_plan.Chain(("a", "b"), "a + b * alpha", ("alpha",))
    out = [
        Planned("rms_norm", step, rms_norm_plan.plan(x, w, x, 1e-5, s.weight_offset)),
        Planned("add_rms_norm", step, rms_norm_plan.plan(x, w, x, 1e-5, s.weight_offset, x, x)),
        Planned(f"{s.act}_mul", step, gated_act_plan.plan(_meta(t, 2 * s.intermediate, dtype=dtype),
                                                          _meta(t, s.intermediate, dtype=dtype), s.act)),
        Planned("rope", step, rope_plan.plan(q, k, q, k, _meta(t, dtype=torch.int64), cos_sin, s.rotary_dim, True)),
        Planned("cache_write", step, cache_write_plan.plan(k, k, k_cache, v_cache, _meta(t, dtype=torch.int64))),
        Planned("pointwise_add_mul", step, pointwise_plan.plan(add_mul, {"a": x, "b": x}, {"alpha": 1.0}, x)),
    ]
    config, splits = paged_attention_plan.choose(seqs, query_len, s.heads, s.kv_heads, s.head_dim, s.head_dim, dtype,
                                                 target)
    partial = _meta(t, s.heads, splits, s.head_dim, dtype=torch.float32)
    lse = _meta(t, s.heads, splits, dtype=torch.float32)
    tables = _meta(seqs, MAX_BLOCKS_PER_SEQ, dtype=torch.int32)
    attention, *merge = paged_attention_plan.plan(
        q, k_cache, v_cache, q, tables, _meta(seqs, dtype=torch.int32), _meta(seqs + 1, dtype=torch.int32),
        s.head_dim ** -0.5, s.window, s.softcap, query_len, config, splits, partial, lse)
    out.append(Planned("attention", step, attention, config.shared_bytes))
    out += [Planned("attention_merge", step, launch) for launch in merge]
    for name, n, kk, residual in (("matmul_qkv", (s.heads + 2 * s.kv_heads) * s.head_dim, s.hidden, None),
                                  ("matmul_down_residual", s.hidden, s.intermediate, x)):
        config = matmul_plan.choose(t, dtype, target)
        a, b, c = _meta(t, kk, dtype=dtype), _meta(n, kk, dtype=dtype), _meta(t, n, dtype=dtype)
        out.append(Planned(name, step, matmul_plan.plan(a, b, c, config, residual=residual), config.shared_bytes))
    return out + (quant_step_launches(shapes, dtype, target, step, t) if quantized else [])


def quant_step_launches(shapes: ModelShapes, dtype: torch.dtype, target: Target, step: str,
                        tokens: int) -> list[Planned]:
    """The quantized down projection in each mode (few output tiles: decode splits K) and W8A8's activation
    quantizer at one step's token count, planned as the quantized launchers plan them."""
    m, n, k, group = tokens, shapes.hidden, shapes.intermediate, QUANT_GROUP_SIZE
    x = _meta(m, k, dtype=dtype)
    q8, s8 = _meta(n, k, dtype=torch.int8), _meta(n, dtype=torch.float32)
    q4, s4 = _meta(k // 8, n, dtype=torch.int32), _meta(k // group, n, dtype=torch.float32)
    z4, xs = _meta(k // group, n // 8, dtype=torch.int32), _meta(k, dtype=torch.float32)
    a_scale = _meta(m, dtype=torch.float32)
    out = []
    for name, mode, weight, scales, extra in (
            ("int8", "int8", q8, s8, {}), ("int4", "int4", q4, s4, {"input_scale": xs}),
            ("int4_zp", "int4", q4, s4, {"qzeros": z4}), ("w8a8", "w8a8", q8, s8, {"a_scale": a_scale})):
        config, split = quant_matmul_plan.choose(m, n, k, mode, dtype, "qzeros" in extra, target)
        a = _meta(m, k, dtype=torch.int8) if mode == "w8a8" else x
        c = _meta(m, n, dtype=torch.float32 if split > 1 else dtype)
        launch = quant_matmul_plan.plan(a, weight, scales, c, mode, config, split, group_size=group, **extra)
        out.append(Planned(f"quant_{name}", step, launch, config.shared_bytes))
    out.append(Planned("quantize_rows", step, quant_matmul_plan.plan_quantize_rows(
        x, _meta(m, k, dtype=torch.int8), _meta(m, dtype=torch.float32))))
    return out


def model_launches(shapes: ModelShapes, dtype: torch.dtype, target: Target, block_size: int = 16,
                   quantized: bool = False) -> list[Planned]:
    """Every kernel launch of every step in STEPS."""
    return [p for step, seqs, query_len in STEPS
            for p in step_launches(shapes, dtype, target, step, seqs, query_len, block_size, quantized)]


@contextlib.contextmanager
def gpu_compilation() -> Iterator[None]:
    """Real `@triton.jit` functions (not the interpreter's), and ptxas run every time so its log is seen."""
    from triton import knobs

    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    old_log, old_always = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = True, True
    try:
        yield
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = old_log, old_always
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


def _compile(launch: Launch, capability: int) -> tuple[Any, int, int]:
    """(compiled kernel, registers, spill bytes) from ptxas's verbose log."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = launch.fn()
    signature = launch.signature()
    names = list(signature)
    constexprs = {(names.index(k),): v for k, v in launch.constexprs.items()}
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        kernel = triton.compile(ASTSource(fn, signature, constexprs, launch.attrs()),
                                target=GPUTarget("cuda", capability, 32),
                                options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})
    text = log.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", text)]
    return kernel, int(regs.group(1)) if regs else -1, sum(spills)


def _key(launch: Launch) -> tuple:
    """What makes two launches one compiled kernel (runtime sizes aside)."""
    return (launch.source(), launch.kernel.name, tuple(sorted(launch.constexprs.items())),
            tuple(launch.signature().items()), tuple(sorted(launch.attrs())), launch.num_warps, launch.num_stages)


def compile_launches(planned: list[Planned], target: str, shared_limit: int, root: Path) -> list[KernelRecord]:
    """Compile each distinct kernel of `planned` once for `target` (inside `gpu_compilation`), writing its
    source and cubin under root; a kernel's record lists every step that launches it."""
    capability = _target(target)
    root.mkdir(parents=True, exist_ok=True)
    by_key: dict[tuple, tuple[Planned, KernelRecord, Any]] = {}
    for p in planned:
        key = _key(p.launch)
        if key in by_key:
            by_key[key][1].steps.append(p.step)
            continue
        kernel, regs, spills = _compile(p.launch, capability)
        record = KernelRecord(p.kernel, p.launch.label, target, [p.step], dict(p.launch.constexprs),
                              p.launch.num_warps, p.launch.num_stages, int(kernel.metadata.shared), p.shared_bound,
                              regs, spills, shared_limit)
        by_key[key] = (p, record, kernel)
    # A kernel compiled once is named plainly; one compiled per step shape is named by its first step.
    variants = Counter(p.kernel for p, _, _ in by_key.values())
    records = []
    for p, record, kernel in by_key.values():
        if variants[p.kernel] > 1:
            record.name = f"{p.kernel}_{record.steps[0]}"
        source, cubin = root / f"{record.name}.py", root / f"{record.name}.cubin"
        source.write_text(p.launch.source())
        cubin.write_bytes(kernel.asm["cubin"])
        record.source, record.cubin = str(source), str(cubin)
        records.append(record)
    return records


def _target(target: str) -> int:
    kind, _, arch = target.partition(":")
    if kind != "cuda" or not arch.isdigit():
        raise ValueError(f"target: {target!r} is not of the form cuda:<capability>, e.g. cuda:90")
    return int(arch)


def _interpreter_bound() -> bool:
    """Whether the real compiler cannot run in this process: Triton was imported under TRITON_INTERPRET (or
    would be, the variable being set), which makes its library functions (tl.cdiv, ...) interpreter objects."""
    if interpreting():
        return True
    if "triton" not in sys.modules:
        return False
    from triton.language import standard
    from triton.runtime.jit import JITFunction

    return not isinstance(standard.cdiv, JITFunction)


def cross_compile(compiled_or_config: Any, target: str = "cuda:90", out_dir: str | Path = "kernels",
                  dtype: torch.dtype | None = None, block_size: int = 16, shared_limit: int | None = None,
                  kernels: list[str] | None = None, strict: bool = True, quantized: bool = False) -> list[KernelRecord]:
    """Compile the kernels a model (a CompiledModel, an HF config, or a dict of its fields) runs on `target`.

    shared_limit lowers the target's per-block shared memory (configs are then chosen for the lower limit; an
    unlisted capability gets sm_86's); `kernels` picks kernels by name; `quantized` adds the quantized linears
    (every mode, at the down projection's size). With `strict`, raises ValueError listing every kernel that
    exceeds the target's shared memory or its config's bound, or spills; otherwise the records say so."""
    capability = _target(target)
    compiled = hasattr(compiled_or_config, "hf_config")  # a CompiledModel knows its dtype; a config does not
    config = compiled_or_config.hf_config if compiled else compiled_or_config
    dtype = dtype or (compiled_or_config.dtype if compiled else torch.bfloat16)
    config = config if isinstance(config, dict) else config.to_dict()
    base = TARGETS.get(capability, TARGETS[86])
    limit = shared_limit or base.shared_limit
    assert limit is not None  # every TARGETS entry has a limit
    device = Target(limit, base.sms)
    root = Path(out_dir) / f"sm_{capability}"
    if _interpreter_bound():
        request = {"config": config, "target": target, "out_dir": str(out_dir),
                   "dtype": str(dtype).removeprefix("torch."), "block_size": block_size, "shared_limit": shared_limit,
                   "kernels": kernels, "strict": False, "quantized": quantized}
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        subprocess.run([sys.executable, "-m", "kiln.codegen.cross_compile"], input=json.dumps(request), text=True,
                       env=env, check=True)
        records = [KernelRecord(**r) for r in json.loads((root / "records.json").read_text())]
    else:
        planned = [p for p in model_launches(ModelShapes.from_config(config), dtype, device, block_size, quantized)
                   if kernels is None or p.kernel in kernels]
        with gpu_compilation():
            records = compile_launches(planned, target, limit, root)
        (root / "records.json").write_text(json.dumps([asdict(r) for r in records], indent=1))
    problems = [p for r in records for p in r.problems()]
    if strict and problems:
        raise ValueError(f"kernels that do not fit {target}:\n" + "\n".join(problems))
    return records


def main() -> None:
    """`python -m kiln.codegen.cross_compile` with a JSON request on stdin: how an interpreter-bound process
    (a test run) cross-compiles in a clean one."""
    request = json.loads(sys.stdin.read())
    request["dtype"] = getattr(torch, request["dtype"])
    cross_compile(request.pop("config"), **request)


if __name__ == "__main__":
    main()
