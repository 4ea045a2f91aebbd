"""Rendered kernels in the cache directory are imported only while their content has the hash in their name:
a changed file is rendered again, and the code put into it never runs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from kiln.codegen import render
from kiln.codegen.kernels import gated_act_plan


def _silu_mul() -> torch.Tensor:
    render._load.cache_clear()  # forget this process's imports: the next launch goes through the cache directory
    gate_up = torch.arange(16, dtype=torch.float32).reshape(2, 8) / 8
    return gated_act_plan.silu_mul(gate_up)


def test_a_changed_cached_kernel_is_rendered_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path))
    want = _silu_mul()
    files = sorted((tmp_path / "kernels").glob("*.py"))
    assert files
    marker = tmp_path / "ran"
    originals = {f: f.read_bytes() for f in files}
    for f in files:
        f.write_text(f"open({str(marker)!r}, 'w').write('x')\n" + originals[f].decode())
    try:
        torch.testing.assert_close(_silu_mul(), want, rtol=0, atol=0)
    finally:
        render._load.cache_clear()
    assert not marker.exists()
    for f in files:
        assert f.read_bytes() == originals[f]
        assert hashlib.sha256(f.read_bytes()).hexdigest()[:16] == f.stem.rpartition("_")[2]
