"""Backend "triton" artifacts round-trip (graph.json rebuilt with the launchers as its targets): the SDPA form,
soft-capped eager attention, and each quantization mode give the same tokens and bit-identical logits."""

from __future__ import annotations

from pathlib import Path

import pytest
from artifact_checks import round_trip

import kiln


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_triton_round_trip(checkpoint, arch: str, tmp_path: Path) -> None:
    round_trip(kiln.compile(str(checkpoint(arch)), backend="triton"), tmp_path / arch)


@pytest.mark.parametrize("quantization", ["int8", "w8a8", "int4"])
def test_quantized_triton_round_trip(checkpoint, quantization: str, tmp_path: Path) -> None:
    round_trip(kiln.compile(str(checkpoint("llama")), backend="triton", quantization=quantization), tmp_path / "q")
