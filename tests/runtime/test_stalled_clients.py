"""Clients that stop reading cost the server what reading ones do, and are aborted after the stall timeout
(issue 21's acceptance, run against `kiln serve` in a subprocess so that its RSS is the server's alone)."""

from __future__ import annotations

import asyncio

import pytest

# Skipped where the server's dependencies are absent, as test_server.py says.
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from kiln.bench.serve import local_server  # noqa: E402
from kiln.bench.stalled_clients import compare, run  # noqa: E402


def test_stalled_clients_for_60_s_hold_no_more_memory_than_reading_ones(checkpoint) -> None:
    # 4 streams of n=16 with logprobs=20 (400 tokens), left unread for 65 s under the default 60 s stall timeout.
    # Their ~4 MB a stream fits the kernel's socket buffers, so they may run to the end rather than be aborted
    # (the next test makes them outrun the buffers); either way nothing may be left and memory stays flat.
    results = compare(str(checkpoint("llama")), stall_seconds=65.0, stall_timeout=60.0)
    reading, stalled = results["reading"], results["stalled"]
    extra = stalled["peak_over_before_mib"] - reading["peak_over_before_mib"]
    assert extra < 50.0, f"stalled clients cost {extra:.1f} MiB more than reading ones: {results}"
    assert stalled["seconds"] >= 65.0, results
    for result in results.values():
        assert result["unfinished_after"] == 0 and result["kv_blocks_in_use_after"] == 0, results


def test_a_stalled_stream_is_aborted_after_the_stall_timeout_and_its_blocks_freed(checkpoint) -> None:
    # 3,000 tokens x 16 sequences with top-20 logprobs are far more than the kernel's socket buffers take (~4 MiB
    # a connection), so the server's writes block, the engine's outputs go unread, and only the stall timeout
    # can end the requests long before they could finish.
    model = str(checkpoint("llama", max_position_embeddings=4096))
    with local_server(model, "m", {"num_kv_blocks": 4 * 16 * 3008 // 16, "stall_timeout": 2.0}) as (url, pid):
        result = asyncio.run(run(url, pid, stall=True, seconds=300.0, max_tokens=3000, until_idle=True))
        assert result["server_idle_first"] and result["seconds"] >= 2.0, result
        assert result["generation_tokens"] < 4 * 16 * 3000, f"the requests ran to the end: {result}"
        assert result["unfinished_after"] == 0 and result["kv_blocks_in_use_after"] == 0, result
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
