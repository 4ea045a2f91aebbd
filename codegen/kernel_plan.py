"""A kernel launch as plain data: which declared kernel, its flags, its arguments by name, grid and config.

Each kernel's plan (kernels/<name>_plan.py) builds a `Launch` from tensor shapes alone, so the same plan serves
a real launch (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1) and a cross-compile from `meta` tensors
at a model's real sizes, where only dtypes and shapes exist. The arguments are checked against the kernel's
declaration (signature.py) and ordered by it when the launch runs or is compiled.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch

from .render import kernel, render
from .signature import Kernel


@dataclass(frozen=True)
class Config:
    """One tiling choice. `shared_bytes` bounds the shared memory its compiled kernel needs from above: `pick`
    trusts it, and the cross-compile check asserts it against the real figure of each config a launcher picks."""

    blocks: dict[str, int]
    num_warps: int = 4
    num_stages: int = 2
    shared_bytes: int = 0


# The SM count a split-K grid is sized for where the device has none (the interpreter): an H100 SXM's, so that
# interpreted runs take the split path a GPU takes.
SIZING_SMS = 132


@dataclass(frozen=True)
class Target:
    """What a launcher's choice depends on beyond shapes: the device's per-block shared memory (opt-in) and
    its SM count. The defaults stand for the interpreter, where neither limits anything."""

    shared_limit: int | None = None
    sms: int | None = None

    @property
    def split_sms(self) -> int:
        """The SM count that sizes split-K grids: the device's, else SIZING_SMS."""
        return self.sms or SIZING_SMS


@dataclass
class Launch:
    """Everything needed to run or cross-compile one call of a declared kernel."""

    kernel: Kernel
    flags: dict[str, Any]
    args: dict[str, Any]  # by name: tensors, scalars and constexprs, as the kernel's declaration names them
    grid: tuple[int, ...]
    num_warps: int = 4
    num_stages: int = 2

    @property
    def label(self) -> str:
        on = [f"{k}={v}" for k, v in sorted(self.flags.items()) if v not in (False, None, "none")]
        return f"{self.kernel.template}.{self.kernel.name}[{','.join(on)}]"

    def bind(self) -> tuple[list[tuple[str, Any]], dict[str, Any]]:
        """(runtime arguments in the kernel's order, constexprs), checked against the declaration."""
        return self.kernel.bind(self.flags, self.args)

    @property
    def constexprs(self) -> dict[str, Any]:
        return self.bind()[1]

    def fn(self) -> Any:
        return kernel(self.kernel.template, self.flags, self.kernel.name)

    def source(self) -> str:
        """The rendered template this launch's kernel comes from."""
        return render(self.kernel.template, self.flags)


def ieee_dots(dtype: torch.dtype) -> bool:
    """Whether dots over `dtype` inputs ask for IEEE float32: a GPU's `tl.dot` on float32 defaults to TF32
    (~1e-3 relative), while a float32 model (HF's included) computes in full float32. bf16/fp16 keep the
    tensor cores' default."""
    return dtype == torch.float32


class _Planning(threading.local):
    """Set inside `planning`: the target launchers plan for, and the list their launches go to."""

    target: Target | None = None
    launches: list[Launch] | None = None


_planning = _Planning()


@contextlib.contextmanager
def planning(target: Target) -> Iterator[list[Launch]]:
    """Inside, launchers plan for `target` whatever their tensors' device, and `run` collects each launch in the
    list this yields instead of launching it: how a compiled model's forward tells what it would launch on a
    GPU it does not have (graph_launches.py)."""
    saved = _planning.target, _planning.launches
    _planning.target, _planning.launches = target, []
    try:
        yield _planning.launches
    finally:
        _planning.target, _planning.launches = saved


def run(launch: Launch) -> None:
    """Launch on the arguments' device (a GPU, or the interpreter for CPU tensors), arguments checked by name
    against the kernel's declaration and passed in its order; inside `planning`, only collect it."""
    runtime, constexprs = launch.bind()
    if _planning.launches is not None:
        _planning.launches.append(launch)
        return
    if not launch.grid or min(launch.grid) == 0:
        return
    launch.fn()[launch.grid](
        *(value for _, value in runtime), **constexprs, num_warps=launch.num_warps, num_stages=launch.num_stages
    )


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pick(configs: list[Config], shared_limit: int | None) -> Config:
    """The first config whose shared memory bound fits (the first when the limit is unknown)."""
    for config in configs:
        if shared_limit is None or config.shared_bytes <= shared_limit:
            return config
    raise ValueError(f"no config fits in {shared_limit} bytes of shared memory")


def device_target(device: torch.device) -> Target:
    """The Target of a device: a CUDA device's properties, or the interpreter's (no limits) elsewhere; inside
    `planning`, the target planned for."""
    if _planning.target is not None:
        return _planning.target
    if device.type != "cuda":
        return Target()
    return _cuda_target(device.index if device.index is not None else torch.cuda.current_device())


@cache
def _cuda_target(index: int) -> Target:
    props = torch.cuda.get_device_properties(index)
    shared = int(getattr(props, "shared_memory_per_block_optin", 0) or props.shared_memory_per_block)
    return Target(shared, props.multi_processor_count)
