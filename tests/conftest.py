"""Shared fixtures: tiny random-weight checkpoints built once per session, loaded from disk like real ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.models.testing import build_tiny_checkpoint


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
