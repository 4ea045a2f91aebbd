"""The runtime over a really compiled tiny Llama, checked against Hugging Face `generate(do_sample=False)`."""

from __future__ import annotations

import random

import pytest
import torch
import transformers

from kiln.runtime.llm import LLM
from kiln.runtime.sampling_params import SamplingParams

VOCAB = 512
GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """(checkpoint dir, HF model, an LLM built from the path): fp32, random weights, a trained tokenizer."""
    from kiln.models.testing import build_tiny_tokenizer

    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        initializer_range=0.1,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.float32).eval()
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    build_tiny_tokenizer(VOCAB, 512).save_pretrained(path)
    llm = LLM(str(path), num_kv_blocks=256, block_size=16)
    return path, model, llm


def hf_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            do_sample=False,
        )
    return out[0, len(prompt) :].tolist()


def random_prompts(count: int, low: int, high: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, VOCAB) for _ in range(rng.randint(low, high))] for _ in range(count)]


def test_batched_greedy_matches_hf_generate(tiny_llama) -> None:
    _, model, llm = tiny_llama
    prompts = random_prompts(6, 1, 70, seed=0)
    lengths = [16, 5, 12, 1, 9, 20]
    outs = llm.generate(prompts, [SamplingParams(max_tokens=n, **GREEDY) for n in lengths])
    for prompt, n, out in zip(prompts, lengths, outs):
        assert out.outputs[0].token_ids == hf_greedy(model, prompt, n)
    assert llm.stats()["kv_blocks_in_use"] == 0


def test_64_requests_with_preemption_match_unconstrained_and_hf(tiny_llama) -> None:
    _, model, llm = tiny_llama
    rng = random.Random(2)
    prompts = random_prompts(64, 1, 48, seed=1)
    params = [SamplingParams(max_tokens=rng.randint(1, 12), **GREEDY) for _ in prompts]
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    tight = LLM(llm.model, num_kv_blocks=12, block_size=8, max_num_batched_tokens=64, max_num_seqs=32)
    outs = tight.generate(prompts, params)
    stats = tight.stats()
    assert stats["preemptions"] > 0
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert stats["kv_blocks_in_use"] == 0
    for i in range(0, 64, 8):  # HF spot checks keep the test fast
        assert expected[i] == hf_greedy(model, prompts[i], params[i].max_tokens)


def test_shared_200_token_prefix_is_computed_once(tiny_llama) -> None:
    _, model, llm = tiny_llama
    prefix = random_prompts(1, 200, 200, seed=3)[0]
    first, second = prefix + [10, 11, 12], prefix + [20, 21, 22, 23, 24]
    sp = SamplingParams(max_tokens=8, **GREEDY)
    llm.generate(first, sp)
    before = llm.stats()["prefix_cache_hit_tokens"]
    out = llm.generate(second, sp)[0]
    assert llm.stats()["prefix_cache_hit_tokens"] - before == 192 == out.num_cached_tokens
    assert out.outputs[0].token_ids == hf_greedy(model, second, 8)


def test_text_prompt_and_decoded_text(tiny_llama) -> None:
    _, model, llm = tiny_llama
    tokenizer = llm.get_tokenizer()
    assert tokenizer is not None
    out = llm.generate("The kiln was built", SamplingParams(max_tokens=10, **GREEDY))[0]
    assert out.prompt_token_ids == tokenizer.encode("The kiln was built")
    assert out.outputs[0].token_ids == hf_greedy(model, out.prompt_token_ids, 10)
    assert out.outputs[0].text == tokenizer.decode(out.outputs[0].token_ids, skip_special_tokens=True)


def test_sampling_is_seed_reproducible_across_batches(tiny_llama) -> None:
    _, _, llm = tiny_llama
    sp = SamplingParams(temperature=0.8, top_k=50, max_tokens=12, seed=11, ignore_eos=True)
    alone = llm.generate([5, 6, 7, 8], sp)[0].outputs[0].token_ids
    crowd = random_prompts(5, 3, 40, seed=9)
    mixed = llm.generate(crowd + [[5, 6, 7, 8]], [SamplingParams(temperature=1.0, max_tokens=10)] * 5 + [sp])
    assert mixed[-1].outputs[0].token_ids == alone
