"""Phase 4 of bench/gpu.py: the whole engine, `kiln.LLM.generate`, on an offline workload, against HF.

The model is the benchmark shape written as a real HF checkpoint directory (random weights, fixed seed; cached
in --work-dir), so kiln loads it the way a user's model is loaded. Workload: random token-id prompts and output
lengths from a seeded generator, greedy, no EOS. Peers on the same checkpoint in the same process, each under its
own time limit: HF `generate` in left-padded static batches (sorted by prompt length, as a user knowing only the
prompts could; a batch runs until its longest output is done, and only each request's own output length counts
as useful), and HF `generate_batch` (continuous batching; one max_new_tokens for all, the longest, so again only
useful tokens count). Agreement with kiln: requests whose first generated token matches, and whose every token
does (bf16 noise on random weights parts greedy paths, so the second figure is expected to be lower).
"""

from __future__ import annotations

import argparse
import functools
import gc
import inspect
import json
import random
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .gpu_common import FIRST_ID, SPECIAL_IDS, Recorder, build_model, peer, sync, wall

Workload = tuple[list[list[int]], list[int]]


def checkpoint(args: argparse.Namespace) -> Path:
    """The saved checkpoint, built once per shape and dtype (written to a temporary name, then renamed)."""
    path = Path(args.work_dir) / f"llama-{'tiny' if args.tiny else '1b'}-{args.dtype}-seed0"
    if not (path / "config.json").is_file():
        tmp = path.with_name(path.name + f".partial-{time.time_ns()}")
        build_model(args.tiny, args.device, args.torch_dtype).save_pretrained(tmp)
        tmp.rename(path)
    return path


def workload(args: argparse.Namespace, vocab: int) -> Workload:
    rng = random.Random(args.seed)
    lo, hi = args.prompt_len
    prompts = [[rng.randrange(FIRST_ID, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(args.num_requests)]
    return prompts, [rng.randint(*args.output_len) for _ in prompts]


def run_kiln(args: argparse.Namespace, path: Path, work: Workload, rec: Recorder) -> list[list[int]]:
    import kiln

    prompts, outputs = work
    start = time.perf_counter()
    # gpu_memory_utilization below the default 0.9 leaves the HF peers room should kiln's pool outlive it.
    llm = kiln.LLM(
        str(path),
        device=args.device,
        dtype=args.dtype,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.prompt_len[1] + args.output_len[1],
        gpu_memory_utilization=args.gpu_memory_utilization,
    )
    rec.figure("kiln_load_compile", seconds=time.perf_counter() - start)
    # Warm-up prompts are not from the workload, so the prefix cache starts cold; one long prompt meets the
    # prefill kernels at full size.
    warm = [[FIRST_ID] * args.prompt_len[1], [FIRST_ID + 1] * args.prompt_len[0]]
    llm.generate(warm, kiln.SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    params = [kiln.SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in outputs]
    tokens: list[list[int]] | None = None
    # Async scheduling (the GPU default) first, then the synchronous engine on the same LLM for comparison;
    # a failure of one is recorded and the other still runs.
    for overlap in (True, False):
        llm.engine.async_scheduling = overlap
        name = "kiln_llm_generate" if overlap else "kiln_llm_generate_sync"
        try:
            sync(args.device)
            start = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            sync(args.device)
            seconds = time.perf_counter() - start
        except Exception as exc:  # noqa: BLE001 - recorded, and the other mode still gets its turn
            rec.figure(name, error=f"{type(exc).__name__}: {exc}")
            continue
        got = [list(o.outputs[0].token_ids) for o in outs]
        if [len(t) for t in got] != outputs:
            raise RuntimeError("kiln returned outputs of the wrong lengths")
        rec.figure(
            name,
            **_throughput(outputs, seconds),
            max_num_seqs=args.max_num_seqs,
            async_scheduling=overlap,
            stats=llm.stats(),
            **({} if tokens is None else _agreement(tokens, got)),
        )
        tokens = tokens or got
    if tokens is None:
        raise RuntimeError("kiln failed with and without async scheduling")
    return tokens


def run_hf_static(args: argparse.Namespace, model: Any, work: Workload) -> tuple[float, list[list[int]], int]:
    """Left-padded batches of --hf-batch-size in order of prompt length; returns (seconds, tokens, generated)."""
    prompts, outputs = work
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    tokens: list[list[int]] = [[] for _ in prompts]
    generated = 0
    _hf_generate(model, [prompts[0][:8]], 2, args.device)  # warm-up: CUDA and cuBLAS start-up
    sync(args.device)
    start = time.perf_counter()
    for b in range(0, len(order), args.hf_batch_size):
        batch = order[b : b + args.hf_batch_size]
        new = max(outputs[i] for i in batch)
        out, width = _hf_generate(model, [prompts[i] for i in batch], new, args.device)
        generated += new * len(batch)
        for row, i in zip(out.tolist(), batch):
            tokens[i] = row[width : width + outputs[i]]
    sync(args.device)
    return time.perf_counter() - start, tokens, generated


def _hf_generate(model: Any, prompts: list[list[int]], new: int, device: str) -> tuple[torch.Tensor, int]:
    pad = SPECIAL_IDS["pad_token_id"]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=new,
            min_new_tokens=new,
            pad_token_id=pad,
        )
    return out, width


def run_hf_continuous(
    args: argparse.Namespace, model: Any, work: Workload, rec: Recorder
) -> tuple[float, list[list[int]], int]:
    """`generate_batch`, twice on the whole workload: the first call warms up (CUDA graph capture, sized for this
    workload) and is reported as the cold figure; the second, timed, reuses that manager where the installed
    transformers can keep it (`persistent_manager`)."""
    import transformers

    prompts, outputs = work
    config = transformers.GenerationConfig(
        max_new_tokens=max(outputs), do_sample=False, pad_token_id=SPECIAL_IDS["pad_token_id"]
    )
    can_keep = "persistent_manager" in inspect.signature(model.generate_batch).parameters
    keep = {"persistent_manager": True} if can_keep else {}
    with torch.no_grad():  # generate_batch updates its own tensors in place: inference_mode breaks it
        cold = wall(lambda: model.generate_batch(inputs=prompts, generation_config=config, **keep), args.device)
        rec.figure("hf_generate_batch_cold", **_throughput(outputs, cold), persistent_manager=can_keep)
        sync(args.device)
        start = time.perf_counter()
        result = model.generate_batch(inputs=prompts, generation_config=config, **keep)
        sync(args.device)
    seconds = time.perf_counter() - start
    ordered = list(result.values())
    if all(re.fullmatch(r"req_\d+", str(r.request_id)) for r in ordered):  # else trust the dict's order
        ordered.sort(key=lambda r: int(str(r.request_id)[4:]))
    tokens = [list(r.generated_tokens)[:n] for r, n in zip(ordered, outputs)]
    if len(tokens) != len(prompts) or [len(t) for t in tokens] != outputs:
        raise RuntimeError(
            f"generate_batch returned {len(tokens)} of {len(prompts)} requests or short outputs "
            "(its log on stderr says why)"
        )
    return seconds, tokens, max(outputs) * len(prompts)


def _throughput(outputs: list[int], seconds: float) -> dict[str, Any]:
    return {"useful_tok_per_s": sum(outputs) / seconds, "seconds": seconds, "useful_tokens": sum(outputs)}


def _agreement(kiln_tokens: list[list[int]] | None, tokens: list[list[int]]) -> dict[str, Any]:
    if kiln_tokens is None:
        return {"agree_first_token": None, "agree_all_tokens": None, "agreement_note": "kiln produced no tokens"}
    return {
        "agree_first_token": sum(a[:1] == b[:1] for a, b in zip(kiln_tokens, tokens)),
        "agree_all_tokens": sum(a == b for a, b in zip(kiln_tokens, tokens)),
        "of_requests": len(tokens),
    }


def engine(args: argparse.Namespace, rec: Recorder) -> None:
    """Checkpoint, then kiln (freed before the peers load theirs), then the two HF peers."""
    path = peer(args, rec, "checkpoint", lambda: checkpoint(args))
    if path is None:
        return
    work = workload(args, json.loads((path / "config.json").read_text())["vocab_size"])
    prompts, outputs = work
    rec.figure(
        "workload",
        requests=len(prompts),
        prompt_tokens=sum(map(len, prompts)),
        useful_output_tokens=sum(outputs),
        prompt_len=list(args.prompt_len),
        output_len=list(args.output_len),
        seed=args.seed,
        greedy=True,
    )
    kiln_tokens = peer(args, rec, "kiln", lambda: run_kiln(args, path, work, rec))
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()

    @functools.cache
    def model() -> Any:
        """Loaded inside the first HF peer, so that a failure to load is that peer's recorded failure."""
        import transformers

        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=args.torch_dtype).to(args.device).eval()

    def report(name: str, run: Callable[[], tuple[float, list[list[int]], int]], **extra: Any) -> None:
        seconds, tokens, generated = run()
        rec.figure(
            name,
            **_throughput(outputs, seconds),
            generated_tokens=generated,
            **_agreement(kiln_tokens, tokens),
            **extra,
        )

    peer(
        args,
        rec,
        "hf_static",
        lambda: report(
            "hf_generate_static",
            lambda: run_hf_static(args, model(), work),
            batch_size=args.hf_batch_size,
            batch_order="sorted by prompt length",
        ),
    )
    peer(
        args,
        rec,
        "hf_generate_batch",
        lambda: report("hf_generate_batch", lambda: run_hf_continuous(args, model(), work, rec)),
    )
