"""Online serving benchmark against kiln's OpenAI-compatible server, reporting what `vllm bench serve` does.

Synthetic prompts of random token ids (exact input lengths) arrive as a Poisson process at --request-rate
(gamma inter-arrivals when --burstiness != 1; `inf` sends all at once), each streamed from /v1/completions
with EOS ignored so that every request yields exactly --output-len tokens. Per request: TTFT, TPOT =
(latency - TTFT) / (output_len - 1), ITL (gaps between streamed chunks) and end-to-end latency; overall:
request and token throughput. With no --base-url the server is started on loopback in a subprocess, so the
client does not share a GIL with it.

    python -m kiln.bench.serve --model DIR --num-prompts 100 --request-rate 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    ttft: float = 0.0
    latency: float = 0.0
    output_tokens: int = 0
    itl: list[float] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_server(model: str, name: str, engine_args: dict[str, float]) -> Iterator[tuple[str, int]]:
    """`kiln.runtime.server.serve` in a subprocess on a free loopback port; yields its base URL and pid."""
    port = free_port()
    options = ", ".join(f"{k}={v!r}" for k, v in engine_args.items() if v is not None)
    code = (
        f"from kiln.runtime.server import serve; serve({model!r}, port={port}, served_model_name={name!r}, "
        f"log_level='warning', {options})"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with status {proc.returncode}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                raise TimeoutError("server did not become healthy in 600 s")
            time.sleep(0.25)
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=30)


async def one_request(client: httpx.AsyncClient, model: str, prompt: list[int], output_len: int) -> Result:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": output_len,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    res = Result()
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                res.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return res
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if chunk.get("choices"):
                    if res.ttft == 0.0:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
                elif chunk.get("usage"):
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                elif "error" in chunk:
                    res.error = chunk["error"]["message"]
                    return res
        res.latency = time.perf_counter() - start
        res.ok = res.ttft > 0
    except httpx.HTTPError as err:
        res.error = f"{type(err).__name__}: {err}"
    return res


async def run(
    url: str,
    model: str,
    prompts: list[list[int]],
    output_len: int,
    rate: float,
    burstiness: float,
    max_concurrency: int | None,
    seed: int,
    api_key: str | None,
) -> tuple[list[Result], float]:
    rng = random.Random(seed)
    limit = asyncio.Semaphore(max_concurrency or len(prompts))
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=None) as client:
        await one_request(client, model, prompts[0], 2)  # warm-up, not counted

        async def limited(prompt: list[int]) -> Result:
            async with limit:
                return await one_request(client, model, prompt, output_len)

        tasks = []
        start = time.perf_counter()
        for prompt in prompts:
            tasks.append(asyncio.ensure_future(limited(prompt)))
            if rate != float("inf"):  # gamma(k, 1/(rate k)) has mean 1/rate; k = 1 is Poisson
                await asyncio.sleep(rng.gammavariate(burstiness, 1.0 / (rate * burstiness)))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {k: float("nan") for k in ("mean", "p50", "p90", "p99")}
    xs = sorted(values)

    def pick(q: float) -> float:  # linear interpolation, as numpy's default
        pos = q * (len(xs) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return {"mean": sum(xs) / len(xs), "p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99)}


def summarize(results: list[Result], duration: float, input_len: int, output_len: int) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "successful_requests": len(ok),
        "failed_requests": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "total_input_tokens": input_len * len(ok),
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration,
        "output_token_throughput": out_tokens / duration,
        "total_token_throughput": (out_tokens + input_len * len(ok)) / duration,
        "ttft_ms": {k: v * 1e3 for k, v in percentiles([r.ttft for r in ok]).items()},
        "tpot_ms": {k: v * 1e3 for k, v in percentiles(tpot).items()},
        "itl_ms": {k: v * 1e3 for k, v in percentiles([g for r in ok for g in r.itl]).items()},
        "e2el_ms": {k: v * 1e3 for k, v in percentiles([r.latency for r in ok]).items()},
    }


def report(s: dict, args: argparse.Namespace) -> str:
    lines = [
        f"{' Serving Benchmark Result ':=^60}",
        f"{'Request rate (req/s):':<40}{args.request_rate:>20}",
        f"{'Successful requests:':<40}{s['successful_requests']:>20}",
        f"{'Failed requests:':<40}{s['failed_requests']:>20}",
        f"{'Benchmark duration (s):':<40}{s['duration_s']:>20.2f}",
        f"{'Total input tokens:':<40}{s['total_input_tokens']:>20}",
        f"{'Total generated tokens:':<40}{s['total_output_tokens']:>20}",
        f"{'Request throughput (req/s):':<40}{s['request_throughput']:>20.2f}",
        f"{'Output token throughput (tok/s):':<40}{s['output_token_throughput']:>20.2f}",
        f"{'Total token throughput (tok/s):':<40}{s['total_token_throughput']:>20.2f}",
    ]
    for key, title in (
        ("ttft_ms", "Time to First Token"),
        ("tpot_ms", "Time per Output Token (excl. 1st)"),
        ("itl_ms", "Inter-token Latency"),
        ("e2el_ms", "End-to-end Latency"),
    ):
        lines.append(f"{' ' + title + ' ':-^60}")
        for stat in ("mean", "p50", "p90", "p99"):
            lines.append(f"{f'{stat.capitalize()} {key[:-3].upper()} (ms):':<40}{s[key][stat]:>20.2f}")
    for err in s["errors"]:
        lines.append(f"error: {err}")
    return "\n".join(lines + ["=" * 60])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        required=True,
        help="checkpoint directory (for the tokenizer's vocabulary, and served unless --base-url is given)",
    )
    p.add_argument("--base-url", default=None, help="an already running server (default: start one)")
    p.add_argument("--served-model-name", default="kiln-bench")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (default: inf)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape; 1 is Poisson")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-json", default=None, help="also write the summary here")
    args = p.parse_args(argv)
    if args.output_len < 2 or args.input_len < 1 or args.num_prompts < 1 or args.request_rate <= 0:
        p.error("need --output-len >= 2, --input-len >= 1, --num-prompts >= 1, --request-rate > 0")

    vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(4, vocab) for _ in range(args.input_len)] for _ in range(args.num_prompts)]
    engine_args = {"max_num_seqs": args.max_num_seqs, "num_kv_blocks": args.num_kv_blocks}

    def go(url: str, name: str) -> tuple[list[Result], float]:
        return asyncio.run(
            run(
                url,
                name,
                prompts,
                args.output_len,
                args.request_rate,
                args.burstiness,
                args.max_concurrency,
                args.seed,
                args.api_key,
            )
        )

    if args.base_url:
        results, duration = go(args.base_url, args.served_model_name)
    else:
        with local_server(args.model, args.served_model_name, engine_args) as (url, _):
            results, duration = go(url, args.served_model_name)
    summary = summarize(results, duration, args.input_len, args.output_len)
    print(report(summary, args))
    if args.result_json:
        Path(args.result_json).write_text(
            json.dumps({"args": vars(args), "cpu_count": os.cpu_count(), **summary}, indent=2)
        )
    return 0 if summary["failed_requests"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
