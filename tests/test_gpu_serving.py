"""On a GPU: checkpoints compiled with device="cuda" match HF's greedy tokens on the same GPU, the KV pool is sized
from gpu_memory_utilization, and an artifact compiled on the CPU serves there. Skipped where there is no GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hf_reference import greedy_agrees, hf_reference

import kiln
from kiln.compiler.export import artifact

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

REQUIRED = ["llama", "mistral", "qwen2", "phi3", "gemma", "gpt2"]
NEW_TOKENS = 24


def _prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(2)
    return [torch.randint(4, vocab, (n,), generator=gen).tolist() for n in (5, 17, 33, 64)]


def _greedy(llm: kiln.LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = kiln.SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("arch", REQUIRED)
def test_checkpoint_on_cuda_matches_hf_greedy(checkpoint, arch: str) -> None:
    path = checkpoint(arch)
    llm = kiln.LLM(str(path), device="cuda")
    assert llm.model.device.type == "cuda" and llm.model.backend == "triton"
    hf = hf_reference(path).to("cuda")
    prompts = _prompts(llm.model.vocab_size)
    for prompt, ours in zip(prompts, _greedy(llm, prompts)):
        with torch.no_grad():
            ref = hf.generate(
                torch.tensor([prompt], device="cuda"),
                do_sample=False,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=3,
            )
        theirs = ref.sequences[0, len(prompt) :].tolist()
        assert ours == theirs or greedy_agrees(ours, theirs, [s[0] for s in ref.scores], tie=2e-3), (
            f"{arch}: kiln {ours} vs HF {theirs}"
        )


def test_kv_pool_is_sized_from_gpu_memory(checkpoint) -> None:
    llm = kiln.LLM(str(checkpoint("llama")), device="cuda", gpu_memory_utilization=0.5)
    stats = llm.stats()
    total = torch.cuda.get_device_properties(0).total_memory
    assert "gpu_memory_utilization" in llm.engine.kv_pool.source
    assert 0 < stats["kv_cache_bytes"] <= 0.5 * total
    assert stats["kv_cache_tokens"] == stats["kv_blocks_total"] * llm.engine.block_size
    with pytest.raises(ValueError, match="gpu_memory_utilization .* needs"):
        kiln.LLM(llm.model, gpu_memory_utilization=1e-6)


def test_artifact_compiled_on_cpu_serves_on_cuda(checkpoint, tmp_path: Path) -> None:
    path = str(checkpoint("llama"))
    on_cpu = kiln.compile(path, device="cpu", backend="triton")
    root = artifact.save(on_cpu, tmp_path / "art")
    loaded = kiln.load(root, device="cuda")
    assert loaded.device.type == "cuda"
    prompts = _prompts(loaded.vocab_size)
    assert _greedy(kiln.LLM(loaded), prompts) == _greedy(kiln.LLM(path, device="cuda"), prompts)
