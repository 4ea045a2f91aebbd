"""Rendered kernels go to a per-session cache directory, not the user's. Importing kernel_checks here, before
pytest imports any test module, runs the kernels in Triton's interpreter when there is no GPU."""

from __future__ import annotations

import kernel_checks  # noqa: F401  (sets TRITON_INTERPRET before kiln.codegen is imported)
import pytest


@pytest.fixture(autouse=True)
def _kernel_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "kiln-cache"))
