"""Render a kernel template with its feature flags, write it to the kernel cache, import it from there.

A template's `@triton.jit` signatures come from its kernels' declarations (signature.py), through the
`kernel_signature(name)` hook. Triton's real compiler reads a kernel's source from its file
(`inspect.getsource`), so a kernel made with `exec()` runs in the interpreter but is rejected on a GPU: every
rendered source is a real file, named by the hash of its content so that identical renders share one file and
one import; a cached file whose content no longer has that hash is rendered again before it is imported.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import jinja2

from .signature import declared, freeze, thaw

TEMPLATE_DIR = Path(__file__).parent / "kernels"

_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
    undefined=jinja2.StrictUndefined,  # a flag a template needs but was not given is an error, not ""
    keep_trailing_newline=True,
    trim_blocks=True,
    lstrip_blocks=True,
)


def cache_dir() -> Path:
    """`$KILN_CACHE_DIR/kernels`, else `~/.cache/kiln/kernels`."""
    root = os.environ.get("KILN_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "kiln"
    return base / "kernels"


def interpreting() -> bool:
    """Whether kernels run in Triton's interpreter (where bf16 `tl.dot` is wrong and must be upcast)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@contextlib.contextmanager
def not_interpreting() -> Iterator[None]:
    """Inside, `interpreting()` is False: plans make a GPU's choices (no interpreter-only upcasts) and `kernel`
    makes real `@triton.jit` functions (cross-compilation, in a process that may run the interpreter)."""
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


def render(template: str, flags: dict[str, Any]) -> str:
    """The Triton source of kernels/<template>.py.jinja for these flags."""
    kernels = declared(template)

    def kernel_signature(name: str = "kernel") -> str:
        if name not in kernels:
            raise ValueError(f"template {template} renders kernel {name!r}, which no plan declares")
        return kernels[name].header(flags)

    return _ENV.get_template(f"{template}.py.jinja").render(**flags, kernel_signature=kernel_signature)


def _verified(path: Path, digest: str) -> bool:
    """Whether the cached file `path` exists and its content still has the hash its name carries: the cache
    is outside kiln's control, so a file there is imported only once it proves to be what kiln rendered."""
    try:
        return not path.is_symlink() and hashlib.sha256(path.read_bytes()).hexdigest()[:16] == digest
    except OSError:
        return False


@cache
def _load(template: str, frozen: tuple, interpret: bool) -> ModuleType:
    """`interpret` is part of the key: `@triton.jit` makes interpreted functions when it is set, and
    cross-compiling needs real ones in the same process."""
    source = render(template, thaw(frozen))
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{template}_{digest}.py"
    if not _verified(path, digest):  # absent, or changed since it was written: render it again
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(source)
        tmp.replace(path)  # atomic: a concurrent reader sees the whole file or none
    spec = importlib.util.spec_from_file_location(f"kiln_kernels.{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import the rendered kernel {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(template: str, flags: dict[str, Any]) -> ModuleType:
    """The imported module of a rendered template (cached per template and flags)."""
    return _load(template, freeze(flags), interpreting())


def kernel(template: str, flags: dict[str, Any], name: str = "kernel") -> Any:
    """The `@triton.jit` function `name` of a rendered template."""
    return getattr(load(template, flags), name)
