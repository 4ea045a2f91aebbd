"""What the `kiln` subcommands do; parsing lives in `kiln.__main__`.

Each function takes the parsed argparse namespace and returns an exit status. Heavy imports
(torch, transformers, the compiler) happen inside them, so `kiln --help` stays instant.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

DEMO_PROMPTS = [
    "The kiln was built at the edge of the village,",
    "Language models are trained to",
    "What is the capital of France?",
    "Once upon a time there was a small robot who",
]


def _fail(message: str) -> int:
    print(f"kiln: {message}", file=sys.stderr)
    return 2


def _checkpoint_problem(model_dir: str | Path) -> str | None:
    """Why `model_dir` is not a loadable checkpoint directory, or None if it looks fine."""
    path = Path(model_dir)
    if not path.is_dir():
        return f"{model_dir}: no such directory (kiln reads local checkpoints only)"
    if not (path / "config.json").is_file():
        return f"{model_dir}: no config.json; expected a Hugging Face checkpoint directory"
    return None


def _compile(args: argparse.Namespace, model_dir: str | Path) -> Any:
    import torch

    import kiln

    dtype = getattr(torch, args.dtype) if args.dtype else None
    return kiln.compile(str(model_dir), backend=args.backend, dtype=dtype,
                        max_model_len=args.max_model_len)


def compile_cmd(args: argparse.Namespace) -> int:
    """`kiln compile`: compile, print the report on request; saving waits for the artifact format."""
    problem = _checkpoint_problem(args.model_dir)
    if problem:
        return _fail(problem)
    if args.output is not None:
        import kiln

        if not hasattr(kiln.CompiledModel, "save"):
            return _fail("compile -o: saving compiled artifacts is not yet supported "
                         "(the artifact format is not built); run without -o")
    started = time.perf_counter()
    compiled = _compile(args, args.model_dir)
    elapsed = time.perf_counter() - started
    if args.report:
        print(compiled.report.format())
    if args.output is not None:
        compiled.save(args.output)
        print(f"saved {args.output}")
    print(f"compiled {args.model_dir} in {elapsed:.2f} s")
    return 0


def generate(args: argparse.Namespace) -> int:
    """`kiln generate`: compile MODEL and print the completion of one prompt."""
    problem = _checkpoint_problem(args.model)
    if problem:
        return _fail(problem)
    import kiln

    try:
        params = kiln.SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                     top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    except ValueError as err:
        return _fail(str(err))
    llm = kiln.LLM(_compile(args, args.model))
    print(llm.generate([args.prompt], params, use_tqdm=False)[0].outputs[0].text)
    return 0


def _strip_eos(ids: list[int], eos_ids: set[int]) -> list[int]:
    return ids[:-1] if ids and ids[-1] in eos_ids else ids


def _hf_generate(model_dir: Path, prompts: list[str], max_tokens: int,
                 dtype: Any) -> tuple[list[list[int]], float]:
    """HF greedy generation, one prompt at a time (no padding to blur the reference)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype or "auto").eval()
    encoded = [tok(p, return_tensors="pt") for p in prompts]
    options = dict(do_sample=False, max_new_tokens=max_tokens,
                   pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    with torch.inference_mode():
        model.generate(**encoded[0], **{**options, "max_new_tokens": 2})  # warm-up
        started = time.perf_counter()
        outs = [model.generate(**e, **options)[0, e["input_ids"].shape[1]:].tolist() for e in encoded]
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
        problem = _checkpoint_problem(args.model_dir)
        if problem:
            return _fail(problem)
        model_dir = Path(args.model_dir)
    print(f"model: {model_dir}")

    started = time.perf_counter()
    compiled = _compile(args, model_dir)
    print(f"compiled in {time.perf_counter() - started:.2f} s\n")
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

    hf_ids, hf_s = _hf_generate(model_dir, DEMO_PROMPTS, args.max_tokens,
                                getattr(torch, args.dtype) if args.dtype else None)
    eos = _eos_ids(model_dir)
    agree = [_strip_eos(k, eos) == _strip_eos(h, eos) for k, h in zip(kiln_ids, hf_ids)]
    kiln_n, hf_n = sum(map(len, kiln_ids)), sum(map(len, hf_ids))

    print(f"\n== kiln vs HF transformers {_versions()} ==")
    print(f"kiln: {kiln_n} tokens in {kiln_s:.3f} s = {kiln_n / kiln_s:8.1f} tok/s "
          f"(LLM.generate, {len(DEMO_PROMPTS)} prompts batched)")
    print(f"HF:   {hf_n} tokens in {hf_s:.3f} s = {hf_n / hf_s:8.1f} tok/s "
          f"(model.generate, one prompt at a time)")
    print("(one warm-up call each before timing; wall-clock on this machine, not a benchmark)")
    print(f"tokens agree: {sum(agree)}/{len(agree)} prompts")
    for i, ok in enumerate(agree):
        if not ok:
            print(f"  prompt {i}: kiln {kiln_ids[i]}\n            HF   {hf_ids[i]}")
    return 0 if all(agree) else 1


def _versions() -> str:
    import torch
    import transformers

    return f"{transformers.__version__}, torch {torch.__version__}"
