"""Shared fixtures: tiny random-weight checkpoints built once per session, loaded from disk like real ones."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter. Set before anything imports triton.language (transformers
# and torch._dynamo do): Triton 3.6 decides then whether its library functions (tl.cdiv...) are interpreted.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from kiln.models.testing import build_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """`checkpoint(arch, **overrides)` -> directory of a saved tiny model (built once per arguments)."""
    built: dict[tuple, Path] = {}

    def make(arch: str, **overrides) -> Path:
        key = (arch, tuple(sorted(overrides.items())))
        if key not in built:
            built[key] = build_tiny_checkpoint(arch, tmp_path_factory.mktemp(arch), **overrides)
        return built[key]

    return make
