"""Server memory with clients that stop reading, against clients that read: `kiln serve` on loopback.

Four streaming completions with n=16 and logprobs=20 (each update carries every token's top-20 so far) run
twice against a fresh server: once read to the end, once read for one chunk and then left unread with the
connection open. The server's RSS (from /proc) is sampled every 0.25 s; a stalled request must cost about what a
reading one does (the engine keeps one output per consumer) and be aborted after the stall timeout (60 s),
its KV blocks freed.

    python -m kiln.bench.stalled_clients [--stall-seconds 70]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import tempfile
import time
from pathlib import Path

import httpx

from kiln.bench.serve import local_server
from kiln.models.testing import build_tiny_checkpoint

CLIENTS, N, LOGPROBS, MAX_TOKENS = 4, 16, 20, 400


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise RuntimeError(f"{name} missing from /metrics")


async def run(url: str, pid: int, stall: bool, seconds: float) -> dict[str, float]:
    """Peak RSS over the run and what is left in the engine at its end."""
    body = {
        "model": "m",
        "prompt": "Once upon a time",
        "n": N,
        "logprobs": LOGPROBS,
        "max_tokens": MAX_TOKENS,
        "temperature": 1.0,
        "stream": True,
        "ignore_eos": True,
    }
    base, peak = rss_mib(pid), 0.0
    async with httpx.AsyncClient(base_url=url, timeout=None) as http:

        async def client() -> None:
            async with http.stream("POST", "/v1/completions", json=body) as response:
                async for _ in response.aiter_lines():
                    if stall:  # one chunk, then nothing: the connection stays open, unread
                        await asyncio.sleep(seconds)
                        return

        tasks = [asyncio.create_task(client()) for _ in range(CLIENTS)]
        start = time.monotonic()
        while not all(t.done() for t in tasks):
            peak = max(peak, rss_mib(pid))
            await asyncio.sleep(0.25)
        elapsed = time.monotonic() - start
    return {
        "rss_before_mib": base,
        "rss_peak_mib": peak,
        "peak_over_before_mib": peak - base,
        "seconds": elapsed,
        "unfinished_after": metric(url, "kiln_num_unfinished_requests"),
        "kv_blocks_in_use_after": metric(url, "kiln_kv_blocks_in_use"),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stall-seconds", type=float, default=70.0, help="how long the stalled clients wait")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_checkpoint("llama", Path(tmp) / "llama")
        print(
            f"machine: {platform.machine()}, {os.cpu_count()} cpus; tiny llama; {CLIENTS} clients, n={N}, "
            f"logprobs={LOGPROBS}, max_tokens={MAX_TOKENS}"
        )
        for stall in (False, True):
            with local_server(str(path), "m", {"num_kv_blocks": 2048}) as (url, pid):
                result = asyncio.run(run(url, pid, stall, args.stall_seconds))
            label = f"stalled {args.stall_seconds:g} s" if stall else "reading"
            print(f"{label:>16}: " + ", ".join(f"{k} {v:.1f}" for k, v in result.items()), flush=True)


if __name__ == "__main__":
    main()
