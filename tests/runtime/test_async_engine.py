"""AsyncLLMEngine: concurrent streams share one batch; a consumer that leaves aborts its request."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from runtime_fakes import FakeModel, reference_greedy

from kiln.runtime.async_engine import AsyncLLMEngine
from kiln.runtime.engine import LLMEngine
from kiln.runtime.sampling_params import SamplingParams

pytestmark = pytest.mark.usefixtures("overlap")  # every test with async scheduling off and on

VOCAB = 64


def make_engine() -> AsyncLLMEngine:
    return AsyncLLMEngine(LLMEngine(FakeModel(VOCAB), num_kv_blocks=64, block_size=4))


async def collect(engine: AsyncLLMEngine, prompt: list[int], max_tokens: int, rid: str) -> list:
    return [
        out
        async for out in engine.generate(
            prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), rid
        )
    ]


def test_concurrent_streams_are_correct_and_incremental() -> None:
    async def main():
        engine = make_engine()
        prompts = [[1, 2, 3], [4] * 17, [5, 6], [7, 8, 9, 10, 11]]
        results = await asyncio.gather(*(collect(engine, p, 6 + i, f"r{i}") for i, p in enumerate(prompts)))
        await engine.shutdown()
        return engine, prompts, results

    engine, prompts, results = asyncio.run(main())
    for i, (prompt, stream) in enumerate(zip(prompts, results)):
        assert [len(o.outputs[0].token_ids) for o in stream] == list(range(1, 7 + i))
        assert stream[-1].finished and not any(o.finished for o in stream[:-1])
        assert stream[-1].outputs[0].token_ids == reference_greedy(prompt, 6 + i, VOCAB)
    assert engine.engine.stats()["kv_blocks_in_use"] == 0


def test_closing_the_stream_aborts_the_request() -> None:
    async def main():
        engine = make_engine()
        other = asyncio.create_task(collect(engine, [9, 9, 9], 20, "other"))
        stream = engine.generate([1, 2, 3], SamplingParams(max_tokens=50, ignore_eos=True), "leaver")
        async with contextlib.aclosing(stream):
            async for out in stream:
                if len(out.outputs[0].token_ids) == 3:
                    break
        assert "leaver" not in engine.engine.requests
        done = await other
        await engine.shutdown()
        return engine, done

    engine, done = asyncio.run(main())
    assert done[-1].outputs[0].token_ids == reference_greedy([9, 9, 9], 20, VOCAB)
    assert engine.engine.stats()["kv_blocks_in_use"] == 0


def test_cancelled_consumer_aborts_the_request() -> None:
    async def main():
        engine = make_engine()
        seen = asyncio.Event()

        async def consume():
            async for _ in engine.generate([1, 2], SamplingParams(max_tokens=200, ignore_eos=True), "cancelled"):
                seen.set()

        task = asyncio.create_task(consume())
        await seen.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert "cancelled" not in engine.engine.requests
        await engine.shutdown()
        return engine

    engine = asyncio.run(main())
    assert engine.engine.stats()["kv_blocks_in_use"] == 0


def test_bad_request_raises_to_its_caller_only() -> None:
    async def main():
        engine = make_engine()
        good = asyncio.create_task(collect(engine, [3, 3], 8, "good"))
        with pytest.raises(ValueError, match="top_p"):
            async for _ in engine.generate([1], {"top_p": 2.0}, "bad"):
                pass
        with pytest.raises(ValueError, match="already in use"):
            await asyncio.gather(collect(engine, [1], 4, "dup"), collect(engine, [1], 4, "dup"))
        result = await good
        await engine.shutdown()
        return result

    result = asyncio.run(main())
    assert result[-1].outputs[0].token_ids == reference_greedy([3, 3], 8, VOCAB)


def test_engine_survives_a_new_event_loop() -> None:
    engine = make_engine()
    first = asyncio.run(collect(engine, [1, 2, 3], 4, "a"))
    second = asyncio.run(collect(engine, [1, 2, 3], 4, "b"))
    assert first[-1].outputs[0].token_ids == second[-1].outputs[0].token_ids == reference_greedy([1, 2, 3], 4, VOCAB)


class SlowModel(FakeModel):
    """A forward of at least 2 ms, so that a long request outlives a short stall timeout on any machine."""

    def forward(self, *args):
        time.sleep(0.002)
        return super().forward(*args)


def test_a_client_that_stops_reading_holds_one_output_and_is_aborted_after_the_stall_timeout() -> None:
    async def main():
        engine = AsyncLLMEngine(LLMEngine(SlowModel(VOCAB), num_kv_blocks=300, block_size=4), stall_timeout=0.3)
        params = SamplingParams(temperature=0, max_tokens=1000, ignore_eos=True)  # > 2 s: still running at 0.3 s
        stalled = engine.generate([1, 2, 3], params, "stalled")
        first = await stalled.__anext__()  # reads once, then stops reading
        reader = asyncio.create_task(collect(engine, [4, 5], 8, "reader"))
        for _ in range(200):  # bounded: the stall timeout is 0.3 s
            await asyncio.sleep(0.02)
            if "stalled" not in engine.engine.requests and reader.done():
                break
        mailbox = engine._queues["stalled"]
        held = mailbox._item
        with pytest.raises(TimeoutError, match="read nothing"):
            await stalled.__anext__()
        await engine.shutdown()
        return engine, first, held, await reader

    engine, first, held, reader = asyncio.run(main())
    assert len(first.outputs[0].token_ids) == 1
    assert isinstance(held, TimeoutError), "the mailbox holds one item: the latest update, then the error"
    assert reader[-1].outputs[0].token_ids == reference_greedy([4, 5], 8, VOCAB)
    assert engine.engine.stats()["kv_blocks_in_use"] == 0 and not engine.engine.has_unfinished_requests()
