"""Ahead-of-time kernels at serve time, and a count of the kernels that compile anyway.

`kiln compile --target cuda:NN -o ART` cross-compiles every kernel the lowered graph launches (cross_compile.py)
through Triton's own JIT pointed at the target (jit_target.py), its cache in the artifact (kernels/triton_cache/):
each kernel is stored there exactly as Triton stores what it compiles (cubin, PTX, metadata), under the key the
JIT derives from the kernel's source, specialisation, options, target and Triton version, which is the key a
launch on the GPU looks up (sizes and index pointers are not specialised on: signature.py). At load, on a GPU of
that capability with the same Triton,
`prepare` copies those entries into this process's Triton cache before the first launch: a launch whose key
matches loads its cubin and compiles nothing. Any mismatch (another capability, another Triton, no GPU to use
them on) leaves the JIT to compile as usual and says why, once. `JitCounter` counts the compilations that do
happen (Triton's compilation listener reports each cache miss), which is how a cold start shows it used them.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger("kiln")

CACHE = "triton_cache"  # under the artifact's kernels/sm_<cc>/
_said: set[str] = set()


@dataclass(frozen=True)
class Decision:
    """Whether an artifact's cubins are used here, and why (or why not)."""

    use: bool
    reason: str


def decide(target: str | None, built_with: str | None, capability: int | None, triton_version: str) -> Decision:
    """Use the cubins only on a GPU of the capability they were built for, by the same Triton version."""
    if target is None:
        return Decision(False, "the artifact was compiled without --target: kernels compile on first use")
    if capability is None:
        return Decision(False, f"its {target} cubins need a GPU; none is in use here")
    built_for = int(target.partition(":")[2] or 0)
    if built_for != capability:
        return Decision(False, f"its cubins are for sm_{built_for} and this GPU is sm_{capability}: kernels compile")
    if built_with != triton_version:
        return Decision(False, f"its cubins were built by Triton {built_with}, this is Triton {triton_version}")
    return Decision(True, f"using its sm_{capability} cubins (Triton {triton_version})")


def say_once(decision: Decision) -> None:
    """Log a fallback once per reason (a server loading many artifacts says each reason once)."""
    if not decision.use and decision.reason not in _said:
        _said.add(decision.reason)
        logger.warning("kiln: artifact kernels: %s", decision.reason)


def triton_cache_dir() -> Path:
    from triton import knobs

    return Path(knobs.cache.dir)


def install(entries: Path, cache: Path | None = None) -> int:
    """Copy Triton cache entries (one directory per kernel key) into Triton's cache; returns how many were new."""
    cache = cache or triton_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    added = 0
    for entry in sorted(p for p in entries.iterdir() if p.is_dir()):
        if not (cache / entry.name).exists():
            shutil.copytree(entry, cache / entry.name)
            added += 1
    return added


def prepare(kernels_dir: Path, target: str | None, built_with: str | None, device: Any) -> Decision:
    """At artifact load: install its cubins when they fit `device`, else say (once) why not."""
    import torch
    import triton

    capability = None
    if getattr(device, "type", None) == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        capability = 10 * major + minor
    if target is None and capability is None:
        return Decision(False, "no GPU and no cubins: nothing to do")
    decision = decide(target, built_with, capability, triton.__version__)
    entries = kernels_dir / f"sm_{capability}" / CACHE
    if decision.use and not entries.is_dir():
        decision = Decision(False, f"the artifact has no {entries.relative_to(kernels_dir)}: kernels compile")
    if decision.use:
        added = install(entries)
        logger.info("kiln: artifact kernels: %s (%d new cache entries)", decision.reason, added)
    elif capability is not None:  # a GPU that compiles what the artifact could have brought
        say_once(decision)
    return decision


class JitCounter:
    """Counts Triton compilations (cache misses) while installed; chains any listener already set."""

    def __init__(self) -> None:
        self.compiled = 0
        self.loaded = 0
        self._previous: Any = None

    def __enter__(self) -> JitCounter:
        from triton import knobs

        self._previous = knobs.compilation.listener
        knobs.compilation.listener = self._listen
        return self

    def __exit__(self, *exc: object) -> None:
        from triton import knobs

        knobs.compilation.listener = self._previous

    def _listen(self, *, cache_hit: bool, **fields: Any) -> None:
        if cache_hit:
            self.loaded += 1
        else:
            self.compiled += 1
        if self._previous is not None:
            self._previous(cache_hit=cache_hit, **fields)
