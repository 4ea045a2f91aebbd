"""Compile every generated kernel at a model's real sizes for an NVIDIA target, with no GPU present.

Plans come from the same descriptors the runtime uses, fed `meta` tensors of the model's shapes. Each
candidate config is compiled to a cubin; one whose shared memory exceeds the target's per-block limit, or
whose registers spill, is pruned and the next candidate tried. Per kernel the Triton source, the cubin and a
record (shared memory, registers, spills, what was pruned and why) are written under out_dir/<target>/.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from .launch import Launch
from .render import render
from .templates import cache_write, gated_act, matmul, paged_attention, pointwise, rms_norm, rope

# Usable shared memory per block (opt-in maximum) by compute capability.
SHARED_LIMITS = {90: 227 * 1024, 80: 163 * 1024, 89: 99 * 1024, 86: 99 * 1024}
DECODE_TOKENS, PREFILL_TOKENS = 64, 2048  # the grid sizes recorded; the kernels themselves take any size


@dataclass
class KernelRecord:
    """One kernel as compiled for one target."""

    name: str
    label: str
    target: str
    config: dict[str, Any]
    num_warps: int
    num_stages: int
    shared_bytes: int
    registers: int
    spill_bytes: int
    shared_limit: int
    source: str
    cubin: str
    pruned: list[dict[str, Any]] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.shared_bytes <= self.shared_limit and self.spill_bytes == 0


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
    def from_config(cls, config: Any) -> "ModelShapes":
        get = (lambda k, d=None: config.get(k, d)) if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
        heads = get("num_attention_heads")
        head_dim = get("head_dim") or get("hidden_size") // heads
        act = {"silu": "silu", "gelu": "gelu"}.get(get("hidden_act", "silu"), "gelu_tanh")
        model_type = get("model_type", "")
        return cls(get("hidden_size"), heads, get("num_key_value_heads") or heads, head_dim,
                   get("intermediate_size"), int(head_dim * (get("partial_rotary_factor") or 1.0)), act,
                   1.0 if str(model_type).startswith("gemma") else 0.0, int(get("sliding_window") or 0),
                   float(get("attn_logit_softcapping") or 0.0), min(int(get("max_position_embeddings", 4096)), 1 << 20))


def _meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def model_launches(shapes: ModelShapes, dtype: torch.dtype, block_size: int = 16) -> dict[str, list[Launch]]:
    """Every kernel a decode or prefill step runs, by name; each with its candidates, best first."""
    s, e = shapes, torch.tensor([], dtype=dtype).element_size()
    t, h = PREFILL_TOKENS, s.hidden
    x, w = _meta(t, h, dtype=dtype), _meta(h, dtype=dtype)
    q, k = _meta(t, s.heads, s.head_dim, dtype=dtype), _meta(t, s.kv_heads, s.head_dim, dtype=dtype)
    caches = [_meta(4096, block_size, s.kv_heads, s.head_dim, dtype=dtype) for _ in range(2)]
    tables, seq_lens = _meta(DECODE_TOKENS, 512, dtype=torch.int32), _meta(DECODE_TOKENS, dtype=torch.int32)
    qsl, scale = _meta(DECODE_TOKENS + 1, dtype=torch.int32), s.head_dim ** -0.5
    out: dict[str, list[Launch]] = {
        "rms_norm": [rms_norm.plan(x, w, x, 1e-5, s.weight_offset)],
        "add_rms_norm": [rms_norm.plan(x, w, x, 1e-5, s.weight_offset, x, x)],
        f"{s.act}_mul": [gated_act.plan(_meta(t, 2 * s.intermediate, dtype=dtype), _meta(t, s.intermediate, dtype=dtype), s.act)],
        "rope": [rope.plan(q, k, q, k, _meta(t, dtype=torch.int64), _meta(s.max_positions, s.rotary_dim, dtype=torch.float32),
                           s.rotary_dim, True)],
        "cache_write": [cache_write.plan(k, k, *caches, _meta(t, dtype=torch.int64))],
        "pointwise_add_mul": [pointwise.plan(pointwise.Chain(("a", "b"), "a + b * alpha", ("alpha",)),
                                             {"a": x, "b": x}, {"alpha": 1.0}, x)],
    }
    attn_args = (scale, s.window, s.softcap)
    group = s.heads // s.kv_heads
    for name, max_q, splits in (("attention_prefill", 128, 1), ("attention_decode", 1, 1),
                                ("attention_decode_split", 1, paged_attention.MAX_SPLITS)):
        tokens = DECODE_TOKENS if max_q == 1 else t
        qq = _meta(tokens, s.heads, s.head_dim, dtype=dtype)
        partial = _meta(tokens, s.heads, splits, s.head_dim, dtype=torch.float32)
        lse = _meta(tokens, s.heads, splits, dtype=torch.float32)
        configs = paged_attention.configs(max_q, group, s.head_dim, s.head_dim, e)
        plans = [paged_attention.plan(qq, *caches, qq, tables, seq_lens, qsl, *attn_args, max_q, c, splits, partial, lse)
                 for c in configs]
        out[name] = [p[0] for p in plans]
        if splits > 1:
            out["attention_merge"] = [plans[0][1]]
    for name, m, n, kk, extra in (("matmul_qkv", t, (s.heads + 2 * s.kv_heads) * s.head_dim, h, {}),
                                  ("matmul_down_residual", t, h, s.intermediate, {"residual": x}),
                                  ("matmul_down_residual_decode", DECODE_TOKENS // 4, h, s.intermediate, {"residual": x})):
        a, b, c = _meta(m, kk, dtype=dtype), _meta(n, kk, dtype=dtype), _meta(m, n, dtype=dtype)
        out[name] = [matmul.plan(a, b, c, cfg, **extra) for cfg in matmul.configs(m, e)]
    return out


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
        kernel = triton.compile(ASTSource(fn, signature, constexprs, launch.attrs()), target=GPUTarget("cuda", capability, 32),
                                options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})
    text = log.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", text)]
    return kernel, int(regs.group(1)) if regs else -1, sum(spills)


def _target(target: str) -> int:
    kind, _, arch = target.partition(":")
    if kind != "cuda" or not arch.isdigit():
        raise ValueError(f"target: {target!r} is not of the form cuda:<capability>, e.g. cuda:90")
    return int(arch)


def _interpreter_bound() -> bool:
    """Whether this process imported Triton under TRITON_INTERPRET: its library functions (tl.cdiv, ...) are
    then interpreter objects for good, and the real compiler cannot run here."""
    if "triton" not in sys.modules:
        return False
    import triton.language.standard as standard
    from triton.runtime.jit import JITFunction

    return not isinstance(standard.cdiv, JITFunction)


def cross_compile(compiled_or_config: Any, target: str = "cuda:90", out_dir: str | Path = "kernels",
                  dtype: torch.dtype | None = None, block_size: int = 16, shared_limit: int | None = None,
                  kernels: list[str] | None = None) -> list[KernelRecord]:
    """Compile each kernel of a model (a CompiledModel, an HF config, or a dict of its fields) for `target`.

    shared_limit lowers the target's per-block shared memory (to leave room, or to test pruning); `kernels`
    picks kernels by name. Raises ValueError when no candidate of some kernel fits."""
    capability = _target(target)
    compiled = hasattr(compiled_or_config, "hf_config")  # a CompiledModel knows its dtype; a config does not
    config = compiled_or_config.hf_config if compiled else compiled_or_config
    dtype = dtype or (compiled_or_config.dtype if compiled else torch.bfloat16)
    config = config if isinstance(config, dict) else config.to_dict()
    limit = shared_limit or SHARED_LIMITS.get(capability, 99 * 1024)
    root = Path(out_dir) / f"sm_{capability}"
    if _interpreter_bound():
        request = {"config": config, "target": target, "out_dir": str(out_dir), "dtype": str(dtype).removeprefix("torch."),
                   "block_size": block_size, "shared_limit": limit, "kernels": kernels}
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        subprocess.run([sys.executable, "-m", "kiln.codegen.cross_compile"], input=json.dumps(request), text=True,
                       env=env, check=True)
        return [KernelRecord(**r) for r in json.loads((root / "records.json").read_text())]
    root.mkdir(parents=True, exist_ok=True)
    records = []
    with gpu_compilation():
        for name, candidates in model_launches(ModelShapes.from_config(config), dtype, block_size).items():
            if kernels is None or name in kernels:
                records.append(first_fit(name, candidates, capability, limit, root, target))
    (root / "records.json").write_text(json.dumps([asdict(r) for r in records], indent=1))
    return records


def first_fit(name: str, candidates: list[Launch], capability: int, limit: int, root: Path, target: str) -> KernelRecord:
    pruned = []
    for launch in candidates:
        kernel, regs, spills = _compile(launch, capability)
        shared = int(kernel.metadata.shared)
        config = dict(launch.constexprs)
        if shared > limit or spills > 0:
            pruned.append({"config": config, "num_warps": launch.num_warps, "shared_bytes": shared, "spill_bytes": spills})
            continue
        source, cubin = root / f"{name}.py", root / f"{name}.cubin"
        source.write_text(render(launch.family, launch.flags))
        cubin.write_bytes(kernel.asm["cubin"])
        return KernelRecord(name, launch.label, target, config, launch.num_warps, launch.num_stages, shared, regs,
                            spills, limit, str(source), str(cubin), pruned)
    raise ValueError(f"{name}: no config fits {target} (limit {limit} bytes, no spills): {pruned}")


def main() -> None:
    """`python -m kiln.codegen.cross_compile` with a JSON request on stdin: how an interpreter-bound process
    (a test run) cross-compiles in a clean one."""
    request = json.loads(sys.stdin.read())
    request["dtype"] = getattr(torch, request["dtype"])
    cross_compile(request.pop("config"), **request)


if __name__ == "__main__":
    main()
