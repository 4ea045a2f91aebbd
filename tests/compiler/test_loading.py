"""Loading refuses what kiln cannot compile, with errors that name the problem."""

from __future__ import annotations

import json

import pytest
from transformers import OPTConfig, OPTForCausalLM

import kiln
from kiln.models.registry import UnsupportedModelError


def test_unsupported_architecture_is_named(tmp_path):
    config = OPTConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=1,
        ffn_dim=64,
        num_attention_heads=2,
        max_position_embeddings=64,
        word_embed_proj_dim=32,
    )
    OPTForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="unsupported architecture: model_type 'opt'"):
        kiln.compile(tmp_path)


def test_missing_directory_and_files(tmp_path, checkpoint):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        kiln.compile(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        kiln.compile(tmp_path)
    src = checkpoint("llama")
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no weights"):
        kiln.compile(tmp_path)


def test_runtime_rescaled_rope_is_refused(tmp_path, checkpoint):
    src = checkpoint("llama")
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((src / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "dynamic", "factor": 2.0}
    config.pop("rope_parameters", None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="rope type 'dynamic'"):
        kiln.compile(tmp_path)


def test_max_model_len_is_checked(checkpoint):
    with pytest.raises(ValueError, match="max_model_len"):
        kiln.compile(checkpoint("llama"), max_model_len=10**6)


def test_compile_accepts_a_pretrained_model(checkpoint):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint("llama"))
    compiled = kiln.compile(model)
    assert compiled.report.ops_final["kiln.paged_attention"] == model.config.num_hidden_layers
