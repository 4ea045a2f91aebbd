"""Shared by the artifact round-trip tests of both backends: save, load, and compare step by step."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from hf_reference import run_prefill_then_decode

import kiln
from kiln.compiler.export import artifact
from kiln.compiler.export.manifest import GRAPH

PROMPTS = [[1, 5, 9, 33, 7], [1, 100, 200]]


def round_trip(compiled: kiln.CompiledModel, root: Path) -> None:
    """The artifact of `compiled`, loaded from graph.json, gives the same tokens and bit-identical logits."""
    loaded = kiln.load(artifact.save(compiled, root))
    assert json.loads((root / GRAPH).read_text())["modules"][""]
    want, want_logits = run_prefill_then_decode(compiled, PROMPTS, steps=2)
    got, got_logits = run_prefill_then_decode(loaded, PROMPTS, steps=2)
    assert got == want
    for a, b in zip(got_logits, want_logits, strict=True):
        assert torch.equal(a, b)
