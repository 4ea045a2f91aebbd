"""Decode steps replayed from CUDA graphs give the eager steps' logits (GPU only: graphs cannot be captured on
CPU or in the interpreter)."""

from __future__ import annotations

import pytest
import torch
import transformers
from kernel_checks import DEVICE

import kiln
from kiln.codegen.cuda_graphs import DecodeGraphs
from kiln.ops.metadata import AttentionMetadata

pytestmark = pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a CUDA GPU")


def test_graph_replay_matches_eager_decode(checkpoint) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint("llama")).cuda().eval()
    compiled = kiln.compile(model, backend="triton")
    block_size, per_seq, prompts = 4, 8, [[1, 5, 9, 200, 31], [3, 4], [100, 101, 102]]
    tables = [[b * len(prompts) + s + 1 for b in range(per_seq)] for s in range(len(prompts))]
    caches = compiled.allocate_kv_cache(per_seq * len(prompts) + 1, block_size)
    graphs = DecodeGraphs(compiled, caches, max_blocks_per_seq=per_seq, buckets=(1, 4))
    graphs.capture()
    meta = AttentionMetadata.build([len(p) for p in prompts], [0] * 3, tables, block_size, device="cuda")
    ids = torch.tensor([t for p in prompts for t in p], device="cuda")
    pos = torch.cat([torch.arange(len(p)) for p in prompts]).cuda()
    logits = compiled(ids, pos, meta, caches)
    lens = [len(p) for p in prompts]
    for _ in range(4):
        nxt = logits.argmax(-1)
        meta = AttentionMetadata.build([1] * 3, lens, tables, block_size, device="cuda")
        pos = torch.tensor(lens, device="cuda")
        eager_caches = [c.clone() for c in caches]
        eager = compiled(nxt, pos, meta, eager_caches)
        logits = graphs(nxt, pos, meta)  # batch 3 replays the bucket-4 graph with one padded row
        torch.testing.assert_close(logits, eager, atol=1e-4, rtol=1e-4)
        assert all(torch.equal(a, b) for a, b in zip(caches, eager_caches))  # the padded row wrote nothing
        lens = [n + 1 for n in lens]


def test_engine_uses_graphs_and_keeps_greedy_tokens(checkpoint) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint("llama")).cuda().eval()
    compiled = kiln.compile(model, backend="triton")
    prompts = [[1, 5, 9, 200, 31], [3, 4], [100, 101, 102, 7, 8, 9, 10]]
    params = kiln.SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    graphed = kiln.LLM(compiled, num_kv_blocks=64)
    assert isinstance(graphed.engine.runner.forward, DecodeGraphs)
    eager = kiln.LLM(compiled, num_kv_blocks=64, enforce_eager=True)
    got = [o.outputs[0].token_ids for o in graphed.generate(prompts, params, use_tqdm=False)]
    want = [o.outputs[0].token_ids for o in eager.generate(prompts, params, use_tqdm=False)]
    assert got == want
