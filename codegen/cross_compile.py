"""Compile the kernels a model's launchers pick, at the model's real sizes, for an NVIDIA target with no GPU.

Each step's launches come from every plan's `@at_model_size` hook (model_step.py), planned the way the
launchers plan them: the plans' `choose` functions, given the target's shared-memory limit and SM count, on
`meta` tensors of the step's shapes (decode at every CUDA-graph batch size, prefill of 512-token and 2048-token
sequences), the quantized linears included when asked. So what is compiled here is what a GPU of that capability
would run, not a candidate that happens to compile. Each launch goes through Triton's JIT pointed at the target
(jit_target.py); each distinct kernel (by the JIT's own key) is compiled once and recorded: its shared memory
against the target's limit and against its config's bound (which `pick` trusts), registers and spills; its
source and cubin go under out_dir/sm_<cc>/, Triton's cache entries under out_dir/sm_<cc>/triton_cache/.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import pickle
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from . import kernels as kernels_package
from .aot import CACHE
from .cuda_graphs import capture_sizes
from .jit_target import targeting, warm
from .kernel_plan import SIZING_SMS, Launch, Target
from .model_step import ModelShapes, ModelStep, Planned, step_launches
from .render import interpreting, not_interpreting

# Per capability: usable shared memory per block (opt-in maximum) and the SM count of a representative part
# (H100 SXM, A100, L4, A10), which only sizes the decode split.
TARGETS = {90: Target(232_448, SIZING_SMS), 80: Target(166_912, 108), 89: Target(101_376, 58), 86: Target(101_376, 72)}
# Steps as (name, sequences, query length of each): decode at every batch size a CUDA graph is captured for at
# startup (max_num_seqs 256, the engine's default; the attention's split count depends on the batch), prefill at
# two prompt lengths. Sizes themselves are not compiled in (signature.size): a kernel compiled at one serves all.
STEPS = (
    *((f"decode_{b}", b, 1) for b in capture_sizes(256)),
    ("prefill_512", 4, 512),
    ("prefill_2048", 1, 2048),
)


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


def model_launches(
    shapes: ModelShapes, dtype: torch.dtype, target: Target, block_size: int = 16, quantized: bool = False
) -> list[Planned]:
    """Every kernel launch of every step in STEPS that the plans' `@at_model_size` hooks declare for a model of
    these sizes (what a config alone tells; a compiled model's own launches come from graph_launches.py)."""
    planned = []
    for name, seqs, query_len in STEPS:
        planned += step_launches(ModelStep(shapes, dtype, target, name, seqs, query_len, block_size, quantized))
    return planned


@contextlib.contextmanager
def gpu_compilation(cache: Path, capability: int) -> Iterator[None]:
    """Real `@triton.jit` functions (not the interpreter's) compiling for `capability` (jit_target.py), ptxas's
    log printed, and Triton's cache in `cache` (emptied first, so that each distinct kernel compiles once, its
    log seen, and a launch of the same kernel loads it): what is compiled is stored as Triton stores it."""
    from triton import knobs

    old_log, old_cache = knobs.nvidia.dump_ptxas_log, knobs.cache.dir
    knobs.nvidia.dump_ptxas_log = True
    shutil.rmtree(cache, ignore_errors=True)
    knobs.cache.dir = str(cache)
    try:
        with not_interpreting(), targeting(capability):
            yield
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.cache.dir = old_log, old_cache


def _compile(launch: Launch) -> tuple[Any, int, int]:
    """(compiled kernel, registers, spill bytes) through the JIT (inside `gpu_compilation`); registers and
    spills from ptxas's log, -1 and 0 when the kernel was already in the cache (no log)."""
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        kernel = warm(launch)
    text = log.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", text)]
    return kernel, int(regs.group(1)) if regs else -1, sum(spills)


def _alike(launch: Launch) -> tuple:
    """Everything of a launch the JIT could key on, exactly (a tensor by its dtype and address modulo 16):
    launches equal here are one compiled kernel, without asking the JIT."""
    runtime, constexprs = launch.bind()
    args = tuple((name, (str(v.dtype), v.data_ptr() % 16) if isinstance(v, torch.Tensor) else v) for name, v in runtime)
    return (launch.kernel.template, launch.kernel.name, repr(sorted(launch.flags.items())), args,
            tuple(sorted(constexprs.items())), launch.num_warps, launch.num_stages)  # fmt: skip


def compile_launches(planned: list[Planned], target: str, shared_limit: int, root: Path) -> list[KernelRecord]:
    """Compile each distinct kernel of `planned` once for `target` (inside `gpu_compilation`), writing its
    source and cubin under root; a kernel's record lists every step that launches it. Distinct is Triton's
    own key: launches that a GPU would run with one compiled kernel are one here."""
    root.mkdir(parents=True, exist_ok=True)
    by_key: dict[str, tuple[Planned, KernelRecord, Any]] = {}
    hashes: dict[tuple, str] = {}  # launches alike in everything (every layer's) go to the JIT once
    for p in planned:
        alike = _alike(p.launch)
        if alike in hashes:
            steps = by_key[hashes[alike]][1].steps
            if p.step not in steps:
                steps.append(p.step)
            continue
        kernel, regs, spills = _compile(p.launch)
        hashes[alike] = kernel.hash
        if kernel.hash in by_key:
            steps = by_key[kernel.hash][1].steps
            if p.step not in steps:  # a kernel launched by every layer is listed once per step
                steps.append(p.step)
            continue
        record = KernelRecord(
            p.kernel,
            p.launch.label,
            target,
            [p.step],
            dict(p.launch.constexprs),
            p.launch.num_warps,
            p.launch.num_stages,
            int(kernel.metadata.shared),
            p.shared_bound,
            regs,
            spills,
            shared_limit,
        )
        by_key[kernel.hash] = (p, record, kernel)
    # A kernel compiled once is named plainly; one compiled in variants is named by the first step of each
    # (numbered where several variants start at the same step).
    variants = Counter(p.kernel for p, _, _ in by_key.values())
    firsts = Counter((p.kernel, record.steps[0]) for p, record, _ in by_key.values())
    seen: Counter[tuple[str, str]] = Counter()
    records = []
    for p, record, kernel in by_key.values():
        if variants[p.kernel] > 1:
            first = (p.kernel, record.steps[0])
            seen[first] += 1
            record.name = f"{p.kernel}_{record.steps[0]}" + (f"_{seen[first]}" if firsts[first] > 1 else "")
        source, cubin = root / f"{record.name}.py", root / f"{record.name}.cubin"
        source.write_text(p.launch.source())
        cubin.write_bytes(kernel.asm["cubin"])
        record.source, record.cubin = str(source), str(cubin)
        records.append(record)
    return records


def parse_target(target: str) -> int:
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


def cross_compile(
    model: Any,
    target: str = "cuda:90",
    out_dir: str | Path = "kernels",
    dtype: torch.dtype | None = None,
    block_size: int = 16,
    shared_limit: int | None = None,
    kernels: list[str] | None = None,
    strict: bool = True,
    quantized: bool = False,
) -> list[KernelRecord]:
    """Compile the kernels a model runs on `target`: for a CompiledModel, every launch its own forward makes at
    each step (graph_launches.py); for an HF config (or a dict of its fields), the launches the plans declare for
    its sizes (`model_launches`; `dtype`, default bf16, and `quantized` adding every quantized linear).

    shared_limit lowers the target's per-block shared memory (configs are then chosen for the lower limit; an
    unlisted capability gets sm_86's); `kernels` picks kernels by name. With `strict`, raises ValueError listing
    every kernel that exceeds the target's shared memory or its config's bound, or spills; otherwise the
    records say so."""
    capability = parse_target(target)
    base = TARGETS.get(capability, TARGETS[86])
    limit = shared_limit or base.shared_limit
    assert limit is not None  # every TARGETS entry has a limit
    device = Target(limit, base.sms)
    if hasattr(model, "graph_module"):
        from .graph_launches import graph_launches

        planned = graph_launches(model, device, STEPS, block_size)
    else:
        with not_interpreting():  # the GPU's choices, whatever this process runs
            shapes = ModelShapes.from_config(model)
            planned = model_launches(shapes, dtype or torch.bfloat16, device, block_size, quantized)
    planned = [p for p in planned if kernels is None or p.kernel in kernels]
    root = Path(out_dir) / f"sm_{capability}"
    if _interpreter_bound():  # compile in a clean process; the launches travel pickled (meta tensors, no data)
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(suffix=".pkl") as request:
            request.write(pickle.dumps((planned, target, limit, str(root))))
            request.flush()
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            subprocess.run([sys.executable, "-m", "kiln.codegen.cross_compile", request.name], env=env, check=True)
        records = [KernelRecord(**r) for r in json.loads((root / "records.json").read_text())]
    else:
        records = _compile_into(planned, target, limit, root)
    problems = [p for r in records for p in r.problems()]
    if strict and problems:
        raise ValueError(f"kernels that do not fit {target}:\n" + "\n".join(problems))
    return records


def _compile_into(planned: list[Planned], target: str, limit: int, root: Path) -> list[KernelRecord]:
    """Compile `planned` into root (records.json, sources, cubins, Triton's cache entries)."""
    with gpu_compilation(root / CACHE, parse_target(target)):
        records = compile_launches(planned, target, limit, root)
    (root / "records.json").write_text(json.dumps([asdict(r) for r in records], indent=1))
    return records


def main() -> None:
    """`python -m kiln.codegen.cross_compile REQUEST.pkl`: how an interpreter-bound process (a test run)
    compiles its planned launches in a clean one. The request is this package's own temporary file."""
    for module in pkgutil.iter_modules(kernels_package.__path__):  # the kernels the launches name are declared
        importlib.import_module(f"{kernels_package.__name__}.{module.name}")
    planned, target, limit, root = pickle.loads(Path(sys.argv[1]).read_bytes())
    _compile_into(planned, target, limit, Path(root))


if __name__ == "__main__":
    main()
