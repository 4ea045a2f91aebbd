"""The tiny checkpoints are what every compiler test stands on: they must reload exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kiln.models import testing
from kiln.models.testing import BOS_ID, EOS_ID, PAD_ID, TINY_CONFIGS, UNK_ID


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_checkpoint_reloads_with_identical_logits(arch: str, tmp_path: Path) -> None:
    config = testing.tiny_config(arch)
    torch.manual_seed(0)
    original = AutoModelForCausalLM.from_config(config).eval()
    path = testing.build_tiny_checkpoint(arch, tmp_path, with_tokenizer=False)
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.randint(4, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = original(ids).logits, loaded(ids).logits
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert (loaded.config.bos_token_id, loaded.config.eos_token_id) == (BOS_ID, EOS_ID)
    assert loaded.generation_config.eos_token_id == EOS_ID


def test_sliding_window_variants_are_real() -> None:
    assert testing.tiny_config("mistral").sliding_window == 16
    qwen = testing.tiny_config("qwen2_swa")
    assert qwen.layer_types == ["full_attention", "sliding_attention"]
    assert qwen.sliding_window == 16
    assert "sliding_attention" in testing.tiny_config("gemma2").layer_types


def test_same_seed_same_weights(tmp_path: Path) -> None:
    a = testing.build_tiny_checkpoint("llama", tmp_path / "a", seed=3)
    b = testing.build_tiny_checkpoint("llama", tmp_path / "b", seed=3)
    c = testing.build_tiny_checkpoint("llama", tmp_path / "c", seed=4, with_tokenizer=False)
    weights = [(p / "model.safetensors").read_bytes() for p in (a, b, c)]
    assert weights[0] == weights[1] != weights[2]
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


def test_tokenizer_round_trips_and_matches_config(tmp_path: Path) -> None:
    path = testing.build_tiny_checkpoint("qwen2", tmp_path)
    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) == testing.tiny_config("qwen2").vocab_size
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (UNK_ID, BOS_ID, EOS_ID, PAD_ID)
    for text in ["The kiln was hot.", "Zebra quartz ünïcode 🙂 42\n\tend"]:
        ids = tok(text)["input_ids"]
        assert ids[0] == BOS_ID
        assert tok.decode(ids, skip_special_tokens=True) == text
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<s>assistant\n") and "hi" in prompt


def test_large_vocab_is_filled_exactly() -> None:
    tok = testing.build_tiny_tokenizer(2048)
    assert len(tok) == 2048
    assert tok.decode([2047], skip_special_tokens=True).startswith("<|reserved_")


def test_cached_checkpoint_builds_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path))
    first = testing.cached_checkpoint("gpt2", hidden_size=32)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    again = testing.cached_checkpoint("gpt2", hidden_size=32)
    assert again == first and (again / "model.safetensors").stat().st_mtime_ns == stamp
    assert first.parent == tmp_path / "models"
    other = testing.cached_checkpoint("gpt2", hidden_size=64)
    assert other != first
    named = testing.cached_checkpoint("gpt2", "mine")
    assert named == tmp_path / "models" / "mine"
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.startswith(".")]
