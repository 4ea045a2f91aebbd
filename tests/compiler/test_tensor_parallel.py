"""Tensor parallelism on the CPU (gloo, one worker process per extra rank): a model split over two ranks gives the
whole model's greedy tokens, reports what it split, and a rank that dies fails the engine quickly and cleanly.

Tokens are compared with the unsharded model driven the same way; the ranks' partial sums add up in another order,
so a difference counts only after a step where the unsharded model's top two logits were within 2e-3.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch
from hf_reference import greedy_agrees, run_prefill_then_decode

import kiln
from kiln.compiler.tp_workers import WorkerDiedError

REQUIRED = ["llama", "mistral", "qwen2", "phi3", "gemma", "gpt2"]
TIE = 2e-3


def _prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(4, vocab, (n,), generator=gen).tolist() for n in (5, 19, 11)]


def _assert_same_greedy(whole, split, steps: int = 10) -> None:
    prompts = _prompts(whole.vocab_size)
    ref_seqs, ref_logits = run_prefill_then_decode(whole, prompts, steps)
    seqs, _ = run_prefill_then_decode(split, prompts, steps)
    for s, prompt in enumerate(prompts):
        ref, got = ref_seqs[s][len(prompt) :], seqs[s][len(prompt) :]
        scores = [step[s] for step in ref_logits]
        assert got == ref or greedy_agrees(got, ref, scores, TIE), (ref, got)


def _workers_gone(model) -> bool:
    return all(proc.poll() is not None for proc in model._workers.procs)


@pytest.mark.parametrize(
    "arch, overrides",
    [(arch, {}) for arch in REQUIRED] + [("llama", {"num_key_value_heads": 1}), ("olmo2", {})],
    ids=REQUIRED + ["llama-1kv", "olmo2"],
)
def test_two_ranks_give_the_whole_models_tokens(checkpoint, arch, overrides):
    path = checkpoint(arch, **overrides)
    whole = kiln.compile(path, device="cpu")
    split = kiln.compile(path, device="cpu", tensor_parallel_size=2)
    try:
        assert split.tensor_parallel_size == 2
        _assert_same_greedy(whole, split)
        sharding = split.report.sharding
        assert sharding["size"] == 2
        # A single KV head cannot be split: each rank computes it whole (its K/V projections are replicated).
        # OLMo-2 normalises q and k over all heads at once: its attention stays whole on every rank, its MLP splits.
        replicated = {
            "llama": {"k_proj": 2, "v_proj": 2},
            "olmo2": {"q_proj": 2, "k_proj": 2, "v_proj": 2, "o_proj": 2},
        }
        assert sharding["replicated"] == (replicated[arch] if arch == "olmo2" or overrides else {})
        layers = whole.num_layers
        # Every decoder layer closes two column groups (attention, MLP) with a row-parallel linear each.
        rows = layers if arch == "olmo2" else 2 * layers
        assert sum(sharding["row"].values()) == rows
        # KV heads split between the ranks, or with fewer heads than ranks one replicated on both.
        kv_split = arch != "olmo2"
        expected = [max(lay.kv_heads // 2, 1) if kv_split else lay.kv_heads for lay in whole.kv_layouts]
        assert [lay.kv_heads for lay in split.kv_layouts] == expected
        final = split.report.ops_final
        assert final["_c10d_functional.all_reduce"] == rows + 1  # row linears + the embedding
        assert final["_c10d_functional.all_gather_into_tensor"] == 1  # the logits
        assert "all_reduce" in split.code and "all_gather_into_tensor" in split.code
        assert "tensor parallel over 2 ranks: column-parallel" in split.report.format()
    finally:
        split.shutdown()
    assert _workers_gone(split)


def test_int8_weights_shard_too(checkpoint):
    path = checkpoint("llama")
    whole = kiln.compile(path, device="cpu", quantization="int8")
    split = kiln.compile(path, device="cpu", quantization="int8", tensor_parallel_size=2)
    try:
        assert split.report.quantization["mode"] == "int8"
        int8 = [op for op in whole.report.ops_final if "int8" in op]
        assert int8 and all(split.report.ops_final[op] == whole.report.ops_final[op] for op in int8)
        _assert_same_greedy(whole, split)
    finally:
        split.shutdown()


def test_llm_engine_runs_split_and_a_killed_rank_fails_fast(checkpoint):
    path = checkpoint("qwen2")
    llm = kiln.LLM(path, device="cpu", tensor_parallel_size=2)
    whole = kiln.LLM(path, device="cpu")
    params = kiln.SamplingParams(max_tokens=8, temperature=0.0)
    prompts = _prompts(whole.model.vocab_size)
    ref = [o.outputs[0].token_ids for o in whole.generate(prompts, params, use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == ref
    worker = llm.model._workers.procs[0]
    long = kiln.SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    killer = threading.Timer(0.5, os.kill, (worker.pid, signal.SIGKILL))
    started = time.monotonic()
    killer.start()
    with pytest.raises(WorkerDiedError, match="rank 1"):
        llm.generate(prompts * 8, long, use_tqdm=False)
    assert time.monotonic() - started < 60
    killer.join()
    with pytest.raises(WorkerDiedError, match="exited"):
        llm.engine.check_health()  # what /health reports as 503
    llm.shutdown()
    llm.shutdown()  # twice is harmless
    assert _workers_gone(llm.model)


def test_bad_sizes_are_refused_by_name(checkpoint, tmp_path):
    path = checkpoint("llama")
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="tensor_parallel_size"):
            kiln.compile(path, device="cpu", tensor_parallel_size=bad)
    artifact = tmp_path / "artifact"
    kiln.compiler.export.artifact.save(kiln.compile(path, device="cpu"), artifact)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        kiln.compile(artifact, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="tensor_parallel_size=3"):  # 4 query heads do not split 3 ways
        kiln.compile(path, device="cpu", tensor_parallel_size=3)


def test_cli_takes_the_flag_and_refuses_a_split_artifact(checkpoint, tmp_path, capsys):
    from kiln.__main__ import build_parser, main

    args = build_parser().parse_args(["serve", str(checkpoint("llama")), "-tp", "2"])
    assert args.tensor_parallel_size == 2
    assert main(["compile", str(checkpoint("llama")), "-o", str(tmp_path / "out"), "--tensor-parallel-size", "2"]) == 2
    assert "--tensor-parallel-size: artifacts are single-rank" in capsys.readouterr().err


def test_llm_refuses_a_size_its_compiled_model_lacks(checkpoint):
    with pytest.raises(ValueError, match="tensor_parallel_size: the model given is compiled for 1"):
        kiln.LLM(kiln.compile(checkpoint("llama"), device="cpu"), tensor_parallel_size=2)
