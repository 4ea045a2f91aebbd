"""`kiln demo`: compile a checkpoint (by default a small random-weight Llama built on the spot), generate
greedily for a few prompts, and hold the tokens and the speed against HF transformers on the same weights.
Parsing lives in `kiln.__main__`; the shared helpers in `kiln.commands`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from kiln import commands

DEMO_PROMPTS = [
    "The kiln was built at the edge of the village,",
    "Language models are trained to",
    "What is the capital of France?",
    "Once upon a time there was a small robot who",
]


def _strip_eos(ids: list[int], eos_ids: set[int]) -> list[int]:
    return ids[:-1] if ids and ids[-1] in eos_ids else ids


def _hf_generate(
    model_dir: Path, prompts: list[str], max_tokens: int, dtype: Any, device: Any
) -> tuple[list[list[int]], float]:
    """HF greedy generation on kiln's device, one prompt at a time (no padding to blur the reference)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype or "auto").to(device).eval()
    encoded = [tok(p, return_tensors="pt").to(device) for p in prompts]
    options = dict(
        do_sample=False,
        max_new_tokens=max_tokens,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    with torch.inference_mode():
        model.generate(**encoded[0], **{**options, "max_new_tokens": 2})  # warm-up
        started = time.perf_counter()
        outs = [model.generate(**e, **options)[0, e["input_ids"].shape[1] :].tolist() for e in encoded]
        elapsed = time.perf_counter() - started
    return outs, elapsed


def _eos_ids(model_dir: Path) -> set[int]:
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    except OSError:
        return set()
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


def demo(args: argparse.Namespace) -> int:
    """`kiln demo`: compile, generate greedily, and hold the result against HF transformers."""
    import torch

    import kiln

    if args.model_dir is None:
        from kiln.models.testing import demo_checkpoint

        print("preparing the demo model (random-weight Llama, built once and cached) ...")
        model_dir = demo_checkpoint()
    else:
        problem = commands._checkpoint_problem(args.model_dir)
        if problem:
            return commands._fail(problem)
        model_dir = Path(args.model_dir)
    print(f"model: {model_dir}")

    started = time.perf_counter()
    try:
        compiled = commands._compile(args, model_dir)
    except ValueError as err:
        return commands._fail(str(err))
    print(f"compiled in {time.perf_counter() - started:.2f} s on {compiled.device} (backend {compiled.backend})\n")
    print(compiled.report.format())

    llm = kiln.LLM(compiled)
    params = kiln.SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    warm_up = kiln.SamplingParams(max_tokens=2, temperature=0.0)
    llm.generate(DEMO_PROMPTS[:1], warm_up, use_tqdm=False)
    started = time.perf_counter()
    outputs = llm.generate(DEMO_PROMPTS, params, use_tqdm=False)
    kiln_s = time.perf_counter() - started
    kiln_ids = [list(o.outputs[0].token_ids) for o in outputs]

    print(f"\n== kiln, greedy, up to {args.max_tokens} tokens ==")
    for prompt, out in zip(DEMO_PROMPTS, outputs):
        print(f"{prompt!r}\n  -> {out.outputs[0].text!r} ({out.outputs[0].finish_reason})")

    hf_ids, hf_s = _hf_generate(
        model_dir, DEMO_PROMPTS, args.max_tokens, getattr(torch, args.dtype) if args.dtype else None, compiled.device
    )
    eos = _eos_ids(model_dir)
    agree = [_strip_eos(k, eos) == _strip_eos(h, eos) for k, h in zip(kiln_ids, hf_ids)]
    kiln_n, hf_n = sum(map(len, kiln_ids)), sum(map(len, hf_ids))

    print(f"\n== kiln vs HF transformers {commands.versions()} ==")
    print(
        f"kiln: {kiln_n} tokens in {kiln_s:.3f} s = {kiln_n / kiln_s:8.1f} tok/s "
        f"(LLM.generate, {len(DEMO_PROMPTS)} prompts batched)"
    )
    print(f"HF:   {hf_n} tokens in {hf_s:.3f} s = {hf_n / hf_s:8.1f} tok/s (model.generate, one prompt at a time)")
    print("(one warm-up call each before timing; wall-clock on this machine, not a benchmark)")
    print(f"tokens agree: {sum(agree)}/{len(agree)} prompts")
    for i, ok in enumerate(agree):
        if not ok:
            print(f"  prompt {i}: kiln {kiln_ids[i]}\n            HF   {hf_ids[i]}")
    return 0 if all(agree) else 1
