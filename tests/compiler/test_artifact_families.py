"""Every tiny family round-trips through an artifact (rebuilt from graph.json, not forward.py) with the same
tokens and bit-identical logits on backend "reference", in each quantization mode too. Backend "triton" has
its round trips in tests/codegen/test_artifact_triton.py (its kernels need the interpreter set up there)."""

from __future__ import annotations

from pathlib import Path

import pytest
from artifact_checks import round_trip

import kiln
from kiln.models.testing import TINY_CONFIGS


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_reference_round_trip(checkpoint, arch: str, tmp_path: Path) -> None:
    round_trip(kiln.compile(str(checkpoint(arch)), backend="reference"), tmp_path / arch)


@pytest.mark.parametrize("quantization", ["int8", "w8a8", "int4"])
def test_quantized_round_trip(checkpoint, quantization: str, tmp_path: Path) -> None:
    round_trip(kiln.compile(str(checkpoint("llama")), backend="reference", quantization=quantization), tmp_path / "q")
