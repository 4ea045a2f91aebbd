"""What the `kiln` subcommands do; parsing lives in `kiln.__main__`.

Each function takes the parsed argparse namespace and returns an exit status. Heavy imports
(torch, transformers, the compiler) happen inside them, so `kiln --help` stays instant.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


def _fail(message: str) -> int:
    print(f"kiln: {message}", file=sys.stderr)
    return 2


def _progress(message: str) -> None:
    """One line per stage on stderr, so that long compiles and loads show where they are."""
    print(f"kiln: {message}", file=sys.stderr, flush=True)


def setup_logging() -> None:
    """kiln's own log lines (the engine's KV pool size at start-up, ...) on stderr, like the progress lines."""
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("kiln: %(message)s"))
    logger = logging.getLogger("kiln")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _is_artifact(path: str | Path) -> bool:
    """Mirrors kiln.compiler.export.manifest.is_artifact without importing torch (usage errors stay instant)."""
    return (Path(path) / "manifest.json").is_file() or (Path(path) / "forward.py").is_file()


def _checkpoint_problem(model_dir: str | Path, artifact_ok: bool = False) -> str | None:
    """Why `model_dir` is not a loadable checkpoint (or, where allowed, artifact) directory; None if fine."""
    path = Path(model_dir)
    if not path.is_dir():
        return f"{model_dir}: no such directory (kiln reads local checkpoints only)"
    if _is_artifact(path):
        return None if artifact_ok else f"{model_dir}: is a compiled kiln artifact already, not a checkpoint"
    if not (path / "config.json").is_file():
        return f"{model_dir}: no config.json; expected a Hugging Face checkpoint directory"
    return None


def _compile_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    kwargs: dict[str, Any] = {
        "backend": args.backend,
        "dtype": getattr(torch, args.dtype) if args.dtype else None,
        "max_model_len": args.max_model_len,
        "device": args.device,
    }
    if getattr(args, "tensor_parallel_size", 1) != 1:
        kwargs["tensor_parallel_size"] = args.tensor_parallel_size
    if getattr(args, "quantize", None) is not None:
        kwargs["quantization"] = args.quantize
    return kwargs


def _compile(args: argparse.Namespace, model_dir: str | Path) -> Any:
    import kiln

    _progress(f"compiling {model_dir} (load checkpoint, capture, passes)")
    started = time.perf_counter()
    compiled = kiln.compile(str(model_dir), **_compile_kwargs(args))
    _progress(f"compiled in {time.perf_counter() - started:.2f} s")
    return compiled


def _load(args: argparse.Namespace, model: str) -> Any:
    """MODEL as an artifact (verified, no tracing) or an HF directory (compiled now)."""
    if not _is_artifact(model):
        if getattr(args, "trusted_key", None) is not None:
            raise ValueError(f"--trusted-key: {model} is not a kiln artifact; only artifacts carry signatures")
        return _compile(args, model)
    from kiln.compiler.export import artifact

    started = time.perf_counter()
    _progress(f"loading artifact {model}")
    trusted_key = getattr(args, "trusted_key", None)
    compiled = artifact.load(model, progress=_progress, trusted_key=trusted_key, **_compile_kwargs(args))
    _progress(f"loaded in {time.perf_counter() - started:.2f} s")
    return compiled


def _unavailable_feature(args: argparse.Namespace) -> str | None:
    """--quantize needs kiln.compile to take it; --target needs -o and the codegen cross-compiler."""
    import inspect

    import kiln
    from kiln.compiler.export import artifact

    if args.quantize is not None and "quantization" not in inspect.signature(kiln.compile).parameters:
        return (
            "compile --quantize: not available in this kiln build (kiln.compile has no quantize option "
            "yet); run without --quantize"
        )
    if args.target is not None and not artifact.can_cross_compile():
        return "compile --target: not available in this kiln build (no kernel cross-compiler); run without it"
    if args.target is not None and args.output is None:
        return "compile --target: the kernels go into the artifact; give -o ART too"
    if args.sign_key is not None and args.output is None:
        return "compile --sign-key: the signature goes into the artifact; give -o ART too"
    return None


def compile_cmd(args: argparse.Namespace) -> int:
    """`kiln compile`: compile, print the report on request, and save the artifact with -o."""
    problem = _checkpoint_problem(args.model_dir) or _unavailable_feature(args)
    if problem:
        return _fail(problem)
    output = Path(args.output) if args.output is not None else None
    if output is not None and output.exists() and (not output.is_dir() or any(output.iterdir())):
        return _fail(f"compile -o: {output} exists and is not an empty directory; choose a new path")
    if output is not None and args.tensor_parallel_size != 1:
        return _fail(
            "--tensor-parallel-size: artifacts are single-rank; serve the checkpoint directory with the flag instead"
        )
    started = time.perf_counter()
    try:
        compiled = _compile(args, args.model_dir)
    except (ValueError, FileNotFoundError) as err:
        return _fail(str(err))
    if args.report:
        print(compiled.report.format())
    if output is not None:
        from kiln.compiler.export import artifact

        options = {"quantization": args.quantize} if args.quantize is not None else {}
        try:
            artifact.save(
                compiled, output, options=options, progress=_progress, target=args.target, sign_key=args.sign_key
            )
        except ValueError as err:
            return _fail(str(err))
        print(f"saved {output}")
    print(f"compiled {args.model_dir} in {time.perf_counter() - started:.2f} s")
    return 0


def _speculative_config(args: argparse.Namespace) -> dict | None:
    """--speculative-config's JSON object (checked by the engine), None when not given."""
    text = getattr(args, "speculative_config", None)
    if text is None:
        return None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--speculative-config is not JSON: {err}") from None
    if not isinstance(config, dict):
        raise ValueError("--speculative-config must be a JSON object")
    return config


def generate(args: argparse.Namespace) -> int:
    """`kiln generate`: stream the completion of one prompt to stdout as tokens come."""
    problem = _checkpoint_problem(args.model, artifact_ok=True)
    if problem:
        return _fail(problem)
    import kiln
    from kiln.runtime.engine import LLMEngine

    try:
        params = kiln.SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed
        )
        engine = LLMEngine(
            _load(args, args.model),
            max_num_seqs=1,
            gpu_memory_utilization=args.gpu_memory_utilization,
            speculative_config=_speculative_config(args),
        )
        engine.add_request("generate-0", args.prompt, params)
    except (ValueError, FileNotFoundError) as err:
        return _fail(str(err))
    shown = ""
    while engine.has_unfinished_requests():
        for out in engine.step():
            text = out.outputs[0].text
            sys.stdout.write(text[len(shown) :] if text.startswith(shown) else "\n" + text)
            sys.stdout.flush()
            shown = text
    sys.stdout.write("\n")
    return 0


def bench(args: argparse.Namespace) -> int:
    """`kiln bench`: a small offline throughput run (requests/s, output tokens/s) on MODEL."""
    problem = _checkpoint_problem(args.model, artifact_ok=True)
    if problem:
        return _fail(problem)
    import random

    import kiln

    try:
        llm = kiln.LLM(
            _load(args, args.model),
            max_num_seqs=args.max_num_seqs,
            gpu_memory_utilization=args.gpu_memory_utilization,
            speculative_config=_speculative_config(args),
        )
        rng = random.Random(args.seed)
        vocab = llm.model.vocab_size
        prompts = [[rng.randrange(vocab) for _ in range(args.input_len)] for _ in range(args.num_requests)]
        params = kiln.SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
        llm.generate(prompts[:1], kiln.SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
        started = time.perf_counter()
        outputs = llm.generate(prompts, params)
    except (ValueError, FileNotFoundError) as err:
        return _fail(str(err))
    elapsed = time.perf_counter() - started
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(
        f"{args.num_requests} requests x ({args.input_len} prompt + {args.output_len} output tokens), "
        f"max_num_seqs {args.max_num_seqs}, {versions()}"
    )
    print(
        f"throughput: {args.num_requests / elapsed:.2f} requests/s, {tokens / elapsed:.1f} output tokens/s "
        f"({tokens} tokens in {elapsed:.2f} s)"
    )
    return 0


def serve(args: argparse.Namespace) -> int:
    """`kiln serve`: the OpenAI-compatible server (kiln.runtime.server) on MODEL until interrupted; with --ray,
    replicas of it on Ray Serve (kiln.runtime.ray_serve)."""
    import os

    problem = _checkpoint_problem(args.model, artifact_ok=True)
    if problem:
        return _fail(problem)
    from kiln.runtime.serving import ServerLimits

    ray_only = [
        f for f in ("num_replicas", "min_replicas", "max_replicas", "target_ongoing_requests") if getattr(args, f)
    ]
    if ray_only and not args.ray:
        return _fail(f"--{ray_only[0].replace('_', '-')} needs --ray")
    server = dict(
        api_key=args.api_key or os.environ.get("KILN_API_KEY"),
        served_model_name=args.served_model_name or Path(args.model).name,
        open_metrics=args.open_metrics,
        allowed_hosts=args.allowed_hosts,
        stall_timeout=args.stall_timeout,
        limits=ServerLimits(max_seqs=args.max_request_seqs),
        max_num_seqs=args.max_num_seqs,
        num_kv_blocks=args.num_kv_blocks,
        block_size=args.block_size,
        gpu_memory_utilization=args.gpu_memory_utilization,
        speculative_config=_speculative_config(args),
    )
    try:
        if args.ray:
            from kiln.runtime import ray_serve

            scaling = ray_serve.autoscaling_config(args.min_replicas, args.max_replicas, args.target_ongoing_requests)
            _progress(f"serving replicas on Ray Serve at http://{args.host}:{args.port}/v1")
            ray_serve.serve_forever(
                args.model, args.host, args.port, args.num_replicas or 1, scaling, **server, **_compile_kwargs(args)
            )
            return 0
        from kiln.runtime.server import serve as run_server

        compiled = _load(args, args.model)
        _progress(f"serving on http://{args.host}:{args.port}/v1")
        run_server(compiled, args.host, args.port, **server)
    except (ValueError, FileNotFoundError) as err:
        return _fail(str(err))
    return 0


def profile(args: argparse.Namespace) -> int:
    """`kiln profile`: one decode and one prefill step, op by op, against the device's roofline (runtime/profile)."""
    problem = _checkpoint_problem(args.model, artifact_ok=True)
    if problem:
        return _fail(problem)
    from kiln.runtime import profile as prof

    try:
        text = prof.run(_load(args, args.model), args.batch, args.prompt_len, args.context, args.png, args.json)
    except (ValueError, FileNotFoundError) as err:
        return _fail(str(err))
    print(text)
    return 0


def export(args: argparse.Namespace) -> int:
    """`kiln export`: the reference graph as an MLIR module (kiln.compiler.export.mlir_export) written to -o."""
    from kiln.compiler.export import mlir_export

    try:
        mlir_export.require_torch_mlir()
    except mlir_export.MissingTorchMlir as err:
        return _fail(f"export: {err}")
    problem = _checkpoint_problem(args.model_dir)
    if problem:
        return _fail(problem)
    try:
        static = mlir_export.StaticShape(*map(int, args.static.split(","))) if args.static else None
    except (TypeError, ValueError):
        return _fail(f"export --static: {args.static!r} is not four integers T,S,B,N")
    args.backend = "reference"  # the export decomposes the reference graph's kiln ops
    try:
        compiled = _compile(args, args.model_dir)
        _progress(f"lowering to {args.format} MLIR through torch-mlir")
        path = mlir_export.write_mlir(compiled, args.output, args.format, args.block_size, static)
    except (ValueError, FileNotFoundError, NotImplementedError) as err:
        return _fail(str(err))
    print(f"wrote {path} ({args.format}, {path.stat().st_size / 1e6:.1f} MB)")
    return 0


def versions() -> str:
    import torch
    import transformers

    return f"{transformers.__version__}, torch {torch.__version__}"
