"""The CPU extension in the cache directory is loaded only while its content has the hash in its name; a
library changed there is rebuilt, never loaded."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.backends.cpu import kernels as cpu_kernels

pytestmark = pytest.mark.skipif(cpu_kernels._library() is None, reason="no C compiler: the torch references run")

_LOADED = "from kiln.backends.cpu import kernels; print(kernels._library().__file__)"


def _loaded(cache: Path) -> Path:
    env = {**os.environ, "KILN_CACHE_DIR": str(cache)}
    child = subprocess.run([sys.executable, "-c", _LOADED], env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr
    return Path(child.stdout.strip().splitlines()[-1])


def test_a_changed_cached_library_is_rebuilt(tmp_path: Path) -> None:
    first = _loaded(tmp_path)
    assert first.is_relative_to(tmp_path) and first.name.startswith("kiln_cpu-")
    assert _loaded(tmp_path) == first  # unchanged: reused
    first.write_bytes(first.read_bytes() + b"\x00")  # still a loadable library, but not the one that was built
    second = _loaded(tmp_path)
    assert second.parent == first.parent
    assert f"kiln_cpu-{hashlib.sha256(second.read_bytes()).hexdigest()[:16]}." in second.name  # rebuilt
