"""Triton's own JIT, pointed at a GPU that is not here: how kiln compiles a kernel ahead of time.

A launch on a GPU goes through `JITFunction.run`: Triton specialises the arguments (a pointer's 16-byte
alignment, an integer's divisibility by 16, an integer equal to 1 made a constant), keys its cache by the
result and the options, and compiles on a miss. A kernel compiled ahead of time is used only if it is stored
under that same key, so kiln does not derive the key itself: `warm` runs the JIT's compile-only path
(`warmup`) with Triton's active driver replaced by one that reports the target GPU, and the JIT stores the
kernel exactly where a launch on such a GPU looks for it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from .kernel_plan import Launch


class _Driver:
    """What the JIT's compile path asks of a driver: the current device (a key no real device has), its stream,
    and the target it compiles for."""

    def __init__(self, capability: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", capability, 32)
        self.device = f"kiln-target-sm_{capability}"

    def get_current_device(self) -> str:
        return self.device

    def get_current_stream(self, device: object = None) -> int:
        return 0

    def get_current_target(self) -> Any:
        return self.target


@contextlib.contextmanager
def targeting(capability: int) -> Iterator[None]:
    """Inside: the JIT compiles for an NVIDIA GPU of `capability` (`warm` only; nothing can launch)."""
    from triton.runtime.driver import driver

    previous = driver._active  # not `driver.active`: reading it creates the real driver, which needs a GPU
    driver.set_active(_Driver(capability))
    try:
        yield
    finally:
        driver._active = previous


def warm(launch: Launch) -> Any:
    """Compile `launch` through the JIT (inside `targeting`; a cache hit loads instead) and return Triton's
    compiled kernel. The JIT's in-memory table for the target is dropped after, so each call asks the cache."""
    from triton.runtime.driver import driver

    runtime, constexprs = launch.bind()
    fn = launch.fn()
    try:
        return fn.warmup(
            *(value for _, value in runtime),
            **constexprs,
            grid=launch.grid,
            num_warps=launch.num_warps,
            num_stages=launch.num_stages,
        )
    finally:
        fn.device_caches.pop(driver.active.get_current_device(), None)
