"""Sampler: greedy fast path, filters, penalties, logprobs, and seeds that ignore batch composition."""

from __future__ import annotations

import math
import random

import pytest
import torch
from runtime_fakes import FakeModel
from torch.utils._python_dispatch import TorchDispatchMode

from kiln.backends.cpu import kernels as cpu_kernels
from kiln.runtime.llm import LLM
from kiln.runtime.sampler import Sampler
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.sequence import Request

pytestmark = pytest.mark.usefixtures("overlap")  # every test with async scheduling off and on

VOCAB = 64


def seqs_for(params: list[SamplingParams], outputs: list[list[int]] | None = None):
    """Sequences as the scheduler hands them to the sampler: outputs so far, then the placeholder of the token
    being sampled."""
    seqs = []
    for i, p in enumerate(params):
        seq = Request(f"r{i}", None, [1, 2, 3], p, 0.0).seqs[0]
        seq.token_ids.extend((outputs or [[]] * len(params))[i])
        seq.token_ids.append(-1 - i)
        seq.num_pending = 1
        seqs.append(seq)
    return seqs


def test_seeded_requests_ignore_what_else_is_in_the_batch() -> None:
    target = SamplingParams(temperature=1.3, top_p=0.9, max_tokens=20, seed=1234, ignore_eos=True)
    prompt = [3, 1, 4, 1, 5]
    alone = LLM(FakeModel(VOCAB), num_kv_blocks=128, block_size=4).generate(prompt, target)[0]
    rng = random.Random(0)
    others = [[rng.randrange(VOCAB) for _ in range(rng.randint(1, 30))] for _ in range(6)]
    other_params = [
        SamplingParams(temperature=0.8, max_tokens=rng.randint(1, 25), ignore_eos=True, top_k=5),
        SamplingParams(temperature=0, max_tokens=9),
        SamplingParams(temperature=2.0, seed=7),
        SamplingParams(temperature=1.0, max_tokens=30, presence_penalty=1.0),
        SamplingParams(temperature=0.5, min_p=0.2, logprobs=2),
        SamplingParams(n=3, max_tokens=4),
    ]
    mixed = LLM(FakeModel(VOCAB), num_kv_blocks=128, block_size=4, max_num_batched_tokens=24)
    outs = mixed.generate(others[:3] + [prompt] + others[3:], other_params[:3] + [target] + other_params[3:])
    assert outs[3].outputs[0].token_ids == alone.outputs[0].token_ids
    different_seed = SamplingParams(temperature=1.3, top_p=0.9, max_tokens=20, seed=99, ignore_eos=True)
    again = LLM(FakeModel(VOCAB), num_kv_blocks=128, block_size=4).generate(prompt, different_seed)[0]
    assert again.outputs[0].token_ids != alone.outputs[0].token_ids


def test_all_greedy_batch_is_one_argmax() -> None:
    logits = torch.randn(5, VOCAB)
    out = Sampler([])(logits, seqs_for([SamplingParams(temperature=0)] * 5))
    assert out.token_ids == logits.argmax(-1).tolist() and out.logprobs is None


def test_degenerate_filters_equal_greedy() -> None:
    logits = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(0))
    params = [
        SamplingParams(top_k=1),
        SamplingParams(top_p=1e-6),
        SamplingParams(min_p=1.0),
        SamplingParams(temperature=1e-3, seed=1),
        SamplingParams(top_k=1, temperature=50.0),
        SamplingParams(temperature=0),
    ]
    assert Sampler([])(logits, seqs_for(params)).token_ids == logits.argmax(-1).tolist()


def test_top_k_top_p_keep_sampling_inside_the_allowed_set() -> None:
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]] * 400)
    probs = torch.softmax(logits[0], -1)
    sampler = Sampler([])
    top_k = sampler(logits, seqs_for([SamplingParams(top_k=2)] * 400)).token_ids
    assert set(top_k) == {0, 1}
    # top_p = p0 + tiny: the nucleus is tokens 0 and 1 (the token crossing p is kept).
    top_p = sampler(logits, seqs_for([SamplingParams(top_p=float(probs[0]) + 1e-3)] * 400)).token_ids
    assert set(top_p) == {0, 1}
    min_p = sampler(logits, seqs_for([SamplingParams(min_p=float(probs[2] / probs[0]) - 1e-4)] * 400)).token_ids
    assert set(min_p) == {0, 1, 2}


def test_temperature_sampling_follows_the_softmax() -> None:
    torch.manual_seed(0)
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5]]).repeat(4000, 1)
    tokens = Sampler([])(logits, seqs_for([SamplingParams(temperature=2.0)] * 4000)).token_ids
    expected = torch.softmax(logits[0] / 2.0, -1)
    for t in range(4):
        freq = tokens.count(t) / len(tokens)
        assert abs(freq - float(expected[t])) < 0.03


def test_penalties_push_away_repeated_tokens() -> None:
    logits = torch.zeros(4, VOCAB)
    logits[:, 10] = 1.0
    logits[:, 11] = 0.8
    history = [[10, 10, 10]] * 4
    params = [
        SamplingParams(temperature=0, presence_penalty=0.5),
        SamplingParams(temperature=0, frequency_penalty=0.1),
        SamplingParams(temperature=0, repetition_penalty=2.0),
        SamplingParams(temperature=0, frequency_penalty=0.05),
    ]
    # 1 - 0.5, 1 - 3*0.1, 1 / 2 all drop below 0.8; 1 - 3*0.05 = 0.85 stays above.
    assert Sampler([])(logits, seqs_for(params, history)).token_ids == [11, 11, 11, 10]


def test_repetition_penalty_counts_prompt_tokens_and_negative_logits() -> None:
    logits = torch.full((1, VOCAB), -5.0)
    logits[0, 2] = -1.0  # token 2 is in the prompt [1, 2, 3]
    logits[0, 40] = -1.5
    out = Sampler([])(logits, seqs_for([SamplingParams(temperature=0, repetition_penalty=2.0)]))
    assert out.token_ids == [40]  # -1.0 * 2 = -2.0 < -1.5


def test_min_tokens_masks_eos_and_stop_ids() -> None:
    logits = torch.zeros(2, VOCAB)
    logits[:, 5] = 3.0
    logits[:, 6] = 2.0
    logits[:, 7] = 1.0
    params = [
        SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[6]),
        SamplingParams(temperature=0, min_tokens=2, ignore_eos=True),
    ]
    assert Sampler([5])(logits, seqs_for(params)).token_ids == [7, 5]
    assert Sampler([5])(logits, seqs_for(params, [[9, 9], [9, 9]])).token_ids == [5, 5]


def test_logprobs_are_the_model_distribution() -> None:
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(3))
    params = [SamplingParams(temperature=0, logprobs=3), SamplingParams(temperature=0.7, logprobs=0, seed=5)]
    out = Sampler([])(logits, seqs_for(params))
    reference = torch.log_softmax(logits, -1)
    chosen, top = out.logprobs[0]
    assert len(top) == 3 and out.token_ids[0] in top
    assert set(top) == set(reference[0].topk(3).indices.tolist())
    assert math.isclose(chosen, float(reference[0, out.token_ids[0]]), rel_tol=1e-5)
    chosen, top = out.logprobs[1]
    assert list(top) == [out.token_ids[1]] and math.isclose(chosen, float(reference[1, out.token_ids[1]]), rel_tol=1e-5)


def test_cumulative_logprob_sums_token_logprobs() -> None:
    llm = LLM(FakeModel(VOCAB), num_kv_blocks=64, block_size=4)
    out = llm.generate([5, 6], SamplingParams(temperature=0.9, seed=0, max_tokens=6, logprobs=2, ignore_eos=True))[
        0
    ].outputs[0]
    assert len(out.logprobs) == 6
    total = sum(step[token] for step, token in zip(out.logprobs, out.token_ids))
    assert math.isclose(out.cumulative_logprob, total, rel_tol=1e-6)
    plain = llm.generate([5, 6], SamplingParams(temperature=0, max_tokens=3))[0].outputs[0]
    assert plain.logprobs is None and plain.cumulative_logprob is None


# The device path: Sampler.sample -> DeviceSample, with no host sync ------------------------------------

_SYNCING_OPS = {
    torch.ops.aten._local_scalar_dense,
    torch.ops.aten.is_nonzero,
    torch.ops.aten.equal,
    torch.ops.aten.nonzero,
    torch.ops.aten.masked_select,
    torch.ops.aten.repeat_interleave,
    torch.ops.aten._unique2,
    torch.ops.aten.unique_consecutive,
    torch.ops.aten.unique_dim,
}


class _NoDeviceReads(TorchDispatchMode):
    """Fails on any op whose result depends on reading a tensor's values on the host (an implicit sync on a
    GPU), and on copies from a non-CPU device to the CPU; records every op and its output shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, list[tuple[int, ...]]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in _SYNCING_OPS:
            raise AssertionError(f"{func} reads a tensor on the host")
        source, target = None, None
        if func.overloadpacket is torch.ops.aten._to_copy:
            source, target = args[0], kwargs.get("device")
        elif func.overloadpacket is torch.ops.aten.copy_:
            source, target = args[1], args[0].device
        if target is not None and torch.device(target).type == "cpu" and source.device.type != "cpu":
            raise AssertionError(f"{func} copies to the host")
        out = func(*args, **kwargs)
        shapes = [
            tuple(t.shape) for t in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(t, torch.Tensor)
        ]
        self.calls.append((str(func), shapes))
        return out


def _no_host_reads(*_args, **_kwargs):
    raise AssertionError("sample() read a tensor on the host")


def _sample_without_host_reads(monkeypatch, sampler: Sampler, logits: torch.Tensor, seqs) -> tuple:
    """Run sample() with every host read of a tensor made an error (and, on a GPU, every sync)."""
    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy"):
            patch.setattr(torch.Tensor, name, _no_host_reads)
        if logits.is_cuda:
            torch.cuda.set_sync_debug_mode("error")
        try:
            with _NoDeviceReads() as mode:
                result = sampler.sample(logits, seqs)
        finally:
            if logits.is_cuda:
                torch.cuda.set_sync_debug_mode(0)
    return result, mode.calls


def _every_feature(vocab: int) -> tuple[list[SamplingParams], list[list[int]]]:
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0, repetition_penalty=1.3, logprobs=2),
        SamplingParams(temperature=0.8, top_k=5),
        SamplingParams(top_p=0.7, seed=3),
        SamplingParams(min_p=0.1, frequency_penalty=0.5, presence_penalty=0.2, logprobs=0),
        SamplingParams(temperature=1.2, top_k=8, top_p=0.9, min_p=0.05, seed=4, logprobs=5),
        SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[7, vocab + 5]),
        SamplingParams(temperature=0.5, min_tokens=2, ignore_eos=True, stop_token_ids=[9], seed=5),
    ]
    outputs = [[], [4, 4], [1], [2, 3], [5, 5, 5], [6], [8], []]
    return params, outputs


_DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))]


@pytest.mark.parametrize("device", _DEVICES)
def test_sample_never_reads_the_device(monkeypatch, device: str) -> None:
    params, outputs = _every_feature(VOCAB)
    logits = torch.randn(len(params), VOCAB, generator=torch.Generator().manual_seed(0))
    logits[6, [0, 7]] = 50.0  # row 6 would pick EOS (0) or its stop id (7) but for min_tokens
    sampler = Sampler([0])
    sample, _ = _sample_without_host_reads(monkeypatch, sampler, logits.to(device), seqs_for(params, outputs))
    assert sample.token_ids.device.type == device and sample.token_ids.dtype == torch.int64
    assert sample.top_ids.shape == sample.top_logprobs.shape == (len(params), 5)
    out = sample.to_host()
    assert out.token_ids[0] == int(logits[0].argmax()) and out.token_ids[6] not in (0, 7)
    reference = torch.log_softmax(logits, -1)
    for p, token, lp, row in zip(params, out.token_ids, out.logprobs, reference):
        assert (lp is None) == (p.logprobs is None)
        if lp is not None:
            top = row.topk(p.logprobs).indices.tolist()
            assert list(lp[1]) == top + ([] if token in top else [token])
            assert math.isclose(lp[0], float(row[token]), rel_tol=1e-5, abs_tol=1e-6)


def test_all_greedy_batch_queues_only_the_argmax(monkeypatch) -> None:
    monkeypatch.setattr(cpu_kernels, "applies", lambda *t: False)  # the torch ops a GPU queues, not the C argmax
    logits = torch.randn(16, VOCAB)
    sample, calls = _sample_without_host_reads(
        monkeypatch, Sampler([0]), logits, seqs_for([SamplingParams(temperature=0)] * 16)
    )
    assert [name for name, _ in calls] == ["aten.argmax.default"]
    assert sample.token_ids.tolist() == logits.argmax(-1).tolist()


def test_sampled_batch_makes_few_full_size_tensors(monkeypatch) -> None:
    monkeypatch.setattr(cpu_kernels, "applies", lambda *t: False)
    logits = torch.randn(16, VOCAB)
    _, calls = _sample_without_host_reads(monkeypatch, Sampler([0]), logits, seqs_for([SamplingParams()] * 16))
    full = [name for name, shapes in calls if (16, VOCAB) in shapes]
    allocated = [name for name in full if not name.split(".")[1].endswith("_") and not name.endswith(".out")]
    assert allocated == ["aten.empty_like.default"], full  # the noise buffer; the race reuses it
    assert len(full) <= 6, full  # the draw, log E (-log U then log on the CPU), the race


def test_greedy_rows_take_the_penalised_argmax_beside_sampled_rows() -> None:
    logits = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(2))
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.5, seed=1),
        SamplingParams(temperature=0, frequency_penalty=2.0),
        SamplingParams(top_k=3),
        SamplingParams(temperature=0, min_tokens=1),
        SamplingParams(temperature=0, logprobs=1),
    ]
    first = logits.argmax(-1)
    outputs = [[], [], [int(first[2])] * 3, [], [], []]
    expected = logits.clone()
    expected[2, first[2]] -= 6.0
    expected[4, 0] = float("-inf")  # EOS is 0
    tokens = Sampler([0]).sample(logits, seqs_for(params, outputs)).token_ids.tolist()
    assert [tokens[i] for i in (0, 2, 4, 5)] == expected.argmax(-1)[[0, 2, 4, 5]].tolist()
    assert tokens[3] in logits[3].topk(3).indices.tolist()


def test_seeded_rows_repeat_across_steps_whatever_shares_the_batch() -> None:
    """A seeded sequence keeps advancing its own generator: the same tokens alone or in any batch."""
    gen = torch.Generator().manual_seed(7)
    steps = [torch.randn(VOCAB, generator=gen) for _ in range(6)]
    target = SamplingParams(temperature=1.0, top_p=0.95, seed=42)

    def run(companions: list[SamplingParams], seed_target: SamplingParams = target) -> list[int]:
        seqs = seqs_for(companions[:2] + [seed_target] + companions[2:])
        row = len(companions[:2])
        sampler, tokens = Sampler([0]), []
        for step_logits in steps:
            logits = torch.randn(len(seqs), VOCAB)
            logits[row] = step_logits
            ids = sampler.sample(logits, seqs).token_ids.tolist()
            for seq, token in zip(seqs, ids):  # the token takes its placeholder's place; the next one follows
                seq.token_ids[-1] = token
                seq.token_ids.append(-1)
            tokens.append(ids[row])
        return tokens

    alone = run([])
    crowd = [
        SamplingParams(temperature=0),
        SamplingParams(seed=42),
        SamplingParams(top_k=4, seed=9),
        SamplingParams(min_p=0.2, presence_penalty=1.0),
        SamplingParams(temperature=0.3, logprobs=2),
    ]
    assert run(crowd) == alone
    assert run(crowd[::-1]) == alone
    assert run(crowd, SamplingParams(temperature=1.0, top_p=0.95, seed=43)) != alone


@pytest.mark.parametrize("device", _DEVICES)
def test_all_sampled_top_k_batch_never_reads_the_device(monkeypatch, device: str) -> None:
    """The other branches: every row sampled, top-k and min-p without a top-p (topk instead of a sort)."""
    params = [
        SamplingParams(top_k=3),
        SamplingParams(top_k=7, min_p=0.3, seed=1),
        SamplingParams(min_p=0.5),
        SamplingParams(temperature=2.0),
    ]
    logits = torch.randn(len(params), VOCAB, generator=torch.Generator().manual_seed(1))
    sample, _ = _sample_without_host_reads(monkeypatch, Sampler([0]), logits.to(device), seqs_for(params))
    tokens = sample.to_host().token_ids
    assert tokens[0] in logits[0].topk(3).indices.tolist() and tokens[1] in logits[1].topk(7).indices.tolist()
    probs = torch.softmax(logits, -1)
    assert probs[1, tokens[1]] >= 0.3 * probs[1].max() and probs[2, tokens[2]] >= 0.5 * probs[2].max()
