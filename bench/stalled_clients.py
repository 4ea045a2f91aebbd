"""Server memory with clients that stop reading, against clients that read: `kiln serve` on loopback.

Four streaming completions with n=16 and logprobs=20 (each update carries every token's top-20 so far) run
twice against a fresh server: once read to the end, once read for one chunk and then left unread with the
connection open. The server's RSS (from /proc) is sampled every 0.25 s; a stalled request must cost about what a
reading one does (the engine keeps one output per consumer; the kernel's socket buffers hold a few MiB per
connection) and be aborted after the stall timeout (60 s), its KV blocks freed.

    python -m kiln.bench.stalled_clients [--stall-seconds 70] [--stall-timeout 60]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
    return _metric(httpx.get(f"{url}/metrics", timeout=30).text, name)


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise RuntimeError(f"{name} missing from /metrics")


async def run(
    url: str, pid: int, stall: bool, seconds: float, max_tokens: int = MAX_TOKENS, until_idle: bool = False
) -> dict[str, float]:
    """Peak RSS over the run and what is left in the engine at its end. Stalled clients read one chunk and then
    nothing, keeping the connection open for `seconds`, or with `until_idle` until the server has no unfinished
    request left (it finished or aborted them) if that comes first."""
    body = {
        "model": "m",
        "prompt": "Once upon a time",
        "n": N,
        "logprobs": LOGPROBS,
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "stream": True,
        "ignore_eos": True,
    }
    base, peak = rss_mib(pid), 0.0
    released, started = asyncio.Event(), asyncio.Semaphore(0)
    async with httpx.AsyncClient(base_url=url, timeout=None) as http:

        async def client() -> None:
            async with http.stream("POST", "/v1/completions", json=body) as response:
                async for _ in response.aiter_lines():
                    if stall:  # one chunk, then nothing: the connection stays open, unread
                        started.release()
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(released.wait(), seconds)
                        return

        async def watch() -> None:  # polls the engine once every client is in (and stalled)
            for _ in range(CLIENTS):
                await started.acquire()
            while not released.is_set():
                await asyncio.sleep(1.0)
                text = (await http.get("/metrics", timeout=60)).text
                if _metric(text, "kiln_num_unfinished_requests") == 0:
                    released.set()

        tasks = [asyncio.create_task(client()) for _ in range(CLIENTS)]
        watcher = asyncio.create_task(watch()) if stall and until_idle else None
        start = time.monotonic()
        while not all(t.done() for t in tasks):
            peak = max(peak, rss_mib(pid))
            await asyncio.sleep(0.25)
        elapsed = time.monotonic() - start
        if watcher is not None:
            watcher.cancel()
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {
        "rss_before_mib": base,
        "rss_peak_mib": peak,
        "peak_over_before_mib": peak - base,
        "seconds": elapsed,
        "server_idle_first": float(released.is_set()),
        "generation_tokens": _metric(text, "kiln_generation_tokens_total"),
        "unfinished_after": _metric(text, "kiln_num_unfinished_requests"),
        "kv_blocks_in_use_after": _metric(text, "kiln_kv_blocks_in_use"),
    }


def compare(checkpoint: str, stall_seconds: float, stall_timeout: float) -> dict[str, dict[str, float]]:
    """The reading run and the stalled run, each on a fresh server (so neither inherits the other's heap)."""
    results = {}
    for stall in (False, True):
        engine_args = {"num_kv_blocks": 2048, "stall_timeout": stall_timeout}
        with local_server(checkpoint, "m", engine_args) as (url, pid):
            results["stalled" if stall else "reading"] = asyncio.run(run(url, pid, stall, stall_seconds))
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stall-seconds", type=float, default=70.0, help="how long the stalled clients wait")
    parser.add_argument("--stall-timeout", type=float, default=60.0, help="the server's --stall-timeout")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_checkpoint("llama", Path(tmp) / "llama")
        print(
            f"machine: {platform.machine()}, {os.cpu_count()} cpus; tiny llama; {CLIENTS} clients, n={N}, "
            f"logprobs={LOGPROBS}, max_tokens={MAX_TOKENS}; stall timeout {args.stall_timeout:g} s"
        )
        for label, result in compare(str(path), args.stall_seconds, args.stall_timeout).items():
            print(f"{label:>8}: " + ", ".join(f"{k} {v:.1f}" for k, v in result.items()), flush=True)


if __name__ == "__main__":
    main()
