"""The model runner's incremental inputs equal the metadata built from scratch, step after step."""

from __future__ import annotations

import torch
from runtime_fakes import FakeModel

from kiln.codegen.cuda_graphs import capture_sizes
from kiln.ops.metadata import AttentionMetadata
from kiln.runtime.model_runner import ModelRunner
from kiln.runtime.sampler import Sampler
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.scheduler import SchedulerOutput
from kiln.runtime.sequence import Request

BLOCK = 4


def _seq(prompt: list[int], blocks: list[int], computed: int = 0):
    seq = Request(f"r{prompt[0]}", None, prompt, SamplingParams(), 0.0).seqs[0]
    seq.block_table, seq.num_computed_tokens = list(blocks), computed
    return seq


def _expected(seqs, num_new) -> tuple[list[int], list[int], AttentionMetadata]:
    context = [s.num_computed_tokens for s in seqs]
    meta = AttentionMetadata.build(num_new, context, [s.block_table for s in seqs], BLOCK)
    ids = [t for s, c, n in zip(seqs, context, num_new) for t in s.token_ids[c : c + n]]
    positions = [p for c, n in zip(context, num_new) for p in range(c, c + n)]
    return ids, positions, meta


def _runner(max_num_seqs: int, max_model_len: int) -> ModelRunner:
    return ModelRunner(FakeModel(64), 64, BLOCK, max_num_seqs, max_model_len, Sampler([]), enforce_eager=True)


def _step(seqs, num_new) -> SchedulerOutput:
    return SchedulerOutput(seqs, list(num_new), [s.num_computed_tokens for s in seqs])


def _check(runner: ModelRunner, seqs, num_new) -> None:
    ids, positions, meta = runner.prepare(_step(seqs, num_new))
    want_ids, want_pos, want = _expected(seqs, num_new)
    assert ids.tolist() == want_ids and positions.tolist() == want_pos
    for name in AttentionMetadata.input_names():
        got, ref = getattr(meta, name), getattr(want, name)
        assert got.dtype == ref.dtype and got.tolist() == ref.tolist(), name
    assert meta.max_query_len == max(num_new)


def test_prefill_then_decodes_with_growing_and_replaced_tables() -> None:
    runner = _runner(max_num_seqs=2, max_model_len=64)
    a, b = _seq(list(range(1, 8)), [9, 3]), _seq([20, 21, 22], [5])
    _check(runner, [a, b], [7, 3])  # mixed prefill
    for step in range(6):  # decodes: each sequence's table grows by a block every 4 tokens
        for seq in (a, b):
            seq.num_computed_tokens = len(seq.token_ids)
            seq.token_ids.append(30 + step)
            if len(seq.token_ids) > len(seq.block_table) * BLOCK:
                seq.block_table.append(40 + len(seq.block_table) + 10 * seq.token_ids[0] % 7)
        _check(runner, [b, a] if step % 2 else [a, b], [1, 1])  # batch order changes; rows do not
    a.block_table, a.num_computed_tokens = [11, 12, 13, 14], 0  # preempted and readmitted: a new table
    _check(runner, [a], [len(a.token_ids)])


def test_rows_are_recycled_when_they_run_out() -> None:
    runner = _runner(max_num_seqs=1, max_model_len=32)
    for i in range(5):  # two rows, five sequences one after another (finished ones never released)
        _check(runner, [_seq([i + 1, 2, 3], [i])], [3])
    assert len(runner.rows) <= runner.num_rows


def test_placeholders_take_the_previous_steps_tokens_on_the_device() -> None:
    """A decode input still being sampled (async scheduling) comes from the last step's sampled ids."""
    runner = _runner(max_num_seqs=2, max_model_len=64)
    a, b = _seq([1, 2, 3], [0], computed=3), _seq([4, 5], [1], computed=2)
    a.token_ids.append(-2)  # row 1 of the previous step's samples
    b.token_ids.append(-1)  # row 0
    runner.last_sampled = torch.tensor([17, 42])
    ids, positions, _ = runner.prepare(_step([a, b], [1, 1]))
    assert ids.tolist() == [42, 17] and positions.tolist() == [3, 2] and ids.dtype == torch.int64


def test_capture_sizes_cover_every_batch_up_to_max_num_seqs() -> None:
    assert capture_sizes(256)[:5] == (1, 2, 4, 8, 16) and capture_sizes(256)[-1] == 256
    assert all(b - a <= 8 for a, b in zip(capture_sizes(256), capture_sizes(256)[1:]))
    assert capture_sizes(1) == (1,) and capture_sizes(6) == (1, 2, 4, 6) and capture_sizes(8) == (1, 2, 4, 8)
    assert torch.tensor(capture_sizes(100)).unique().numel() == len(capture_sizes(100))
