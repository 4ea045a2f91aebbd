"""The `kiln` command (`python -m kiln`): demo, compile, generate, bench, serve, export.

Only argparse is imported here so that `--help` answers instantly; the work lives in
`kiln.commands`, which pulls in torch and transformers when a command actually runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

NOT_BUILT = 2  # exit status for commands that are registered but not implemented yet
MODEL_HELP = "a kiln artifact (from `kiln compile -o`) or a Hugging Face checkpoint directory"


def _add_compile_options(p: argparse.ArgumentParser) -> None:
    """Options that shape the compiled engine; for an artifact they were fixed when it was compiled."""
    p.add_argument("--backend", default="auto", help="code generation backend passed to kiln.compile (default: auto)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "float16", "bfloat16"],
        help="weight/activation dtype (default: the checkpoint's own)",
    )
    p.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        metavar="N",
        help="longest prompt+generation the engine is planned for",
    )
    p.add_argument(
        "--device",
        default="auto",
        metavar="DEVICE",
        help="auto (the first CUDA GPU if any, else the CPU), cpu, cuda or cuda:N (default: auto)",
    )
    p.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=int,
        default=1,
        metavar="N",
        help="split the model over N ranks, one process each (N GPUs on a GPU machine; default: 1)",
    )


def _add_trust_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trusted-key",
        default=None,
        metavar="FILE",
        help="PEM ed25519 public key: refuse an artifact that it did not sign (`kiln compile --sign-key`; "
        "needs the `sign` extra)",
    )


def _add_memory_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        metavar="F",
        help="on a GPU, the share of its memory for weights, activations and the KV cache; the cache "
        "gets what the rest leaves (default: 0.9)",
    )


def _add_speculative_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--speculative-config",
        default=None,
        metavar="JSON",
        help='speculative decoding, vLLM\'s shape: \'{"method": "ngram", "num_speculative_tokens": 4}\' '
        'or \'{"method": "draft_model", "model": DIR, "num_speculative_tokens": 4}\'',
    )


def _add_sampling_options(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument(
        "--max-tokens",
        type=int,
        default=max_tokens,
        metavar="N",
        help=f"tokens to generate per prompt (default: {max_tokens})",
    )
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 means greedy (default: 0)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus mass (default: 1)")
    p.add_argument("--top-k", type=int, default=-1, metavar="K", help="-1 disables (default: -1)")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="per-request sampling seed")


def build_parser() -> argparse.ArgumentParser:
    """The full argument tree; kept separate from main() so tests can inspect it."""
    from kiln.version import __version__

    parser = argparse.ArgumentParser(
        prog="kiln",
        description="Compile a Hugging Face causal LM ahead of time into a paged-KV serving engine.",
    )
    parser.add_argument("--version", action="version", version=f"kiln {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="compile a small model, generate, and compare with HF transformers",
        description="Compile MODEL_DIR (default: a cached random-weight Llama built on first use), "
        "generate greedily for a few built-in prompts, then run HF model.generate on the "
        "same prompts and report tokens/s for both and whether the tokens agree. "
        "Exits 1 if they disagree.",
    )
    demo.add_argument(
        "model_dir",
        nargs="?",
        default=None,
        metavar="MODEL_DIR",
        help="a Hugging Face checkpoint directory (default: the demo Llama)",
    )
    demo.add_argument(
        "--max-tokens", type=int, default=32, metavar="N", help="tokens to generate per prompt (default: 32)"
    )
    _add_compile_options(demo)

    comp = sub.add_parser(
        "compile",
        help="compile a checkpoint; -o saves an ahead-of-time artifact",
        description="Compile MODEL_DIR with kiln.compile. With -o ART, write a directory "
        "(manifest with versions and checksums, forward.py, weights.safetensors, "
        "kernels/, config and tokenizer) that `kiln.load` and every kiln command "
        "start from without tracing or re-running passes.",
    )
    comp.add_argument("model_dir", metavar="MODEL_DIR", help="a Hugging Face checkpoint directory")
    comp.add_argument(
        "-o",
        "--output",
        default=None,
        metavar="ART",
        help="write the compiled artifact to this new (or empty) directory",
    )
    comp.add_argument("--report", action="store_true", help="print the compile pass report")
    comp.add_argument(
        "--quantize",
        default=None,
        metavar="SCHEME",
        help="int8, w8a8[:smooth] or int4[:g32|g64|g128][:zp][:awq], each optionally :head "
        "(see kiln.passes.quant_config)",
    )
    comp.add_argument(
        "--target",
        default=None,
        metavar="TARGET",
        help="also cross-compile the generated kernels for TARGET (e.g. cuda:90) into the "
        "artifact's kernels/ dir; no GPU needed (requires -o)",
    )
    comp.add_argument(
        "--sign-key",
        default=None,
        metavar="FILE",
        help="PEM ed25519 private key: write manifest.sig, a detached signature of the artifact's manifest "
        "(requires -o and the `sign` extra)",
    )
    _add_compile_options(comp)

    gen = sub.add_parser(
        "generate",
        help="generate text for one prompt, streamed as it comes",
        description="Load MODEL (compiling it if it is a checkpoint directory) and stream "
        "the text generated for PROMPT to stdout; progress goes to stderr.",
    )
    gen.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    gen.add_argument("prompt", metavar="PROMPT", help="the prompt text")
    _add_sampling_options(gen, max_tokens=64)
    _add_compile_options(gen)
    _add_memory_option(gen)
    _add_speculative_option(gen)
    _add_trust_option(gen)

    bench = sub.add_parser(
        "bench",
        help="offline throughput of MODEL: requests/s and output tokens/s",
        description="Run NUM_REQUESTS random-token prompts through kiln.LLM (greedy, "
        "EOS ignored, after one warm-up request) and report requests/s and "
        "output tokens/s.",
    )
    bench.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    bench.add_argument("--num-requests", type=int, default=16, metavar="N", help="requests (default: 16)")
    bench.add_argument("--input-len", type=int, default=64, metavar="N", help="prompt tokens per request (default: 64)")
    bench.add_argument(
        "--output-len", type=int, default=32, metavar="N", help="output tokens per request (default: 32)"
    )
    bench.add_argument(
        "--max-num-seqs", type=int, default=16, metavar="N", help="sequences batched per step (default: 16)"
    )
    bench.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the random prompts")
    _add_compile_options(bench)
    _add_memory_option(bench)
    _add_speculative_option(bench)
    _add_trust_option(bench)

    prof = sub.add_parser(
        "profile",
        help="time one decode and one prefill step of MODEL op by op, against the device's roofline",
        description="Per op of the compiled graph: calls, time, bytes moved and FLOPs (from the shapes), achieved "
        "GB/s and TFLOP/s, and their fraction of the device's copy bandwidth and matmul rate, measured first.",
    )
    prof.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    prof.add_argument("--batch", type=int, default=8, metavar="B", help="sequences per step (default: 8)")
    prof.add_argument("--prompt-len", type=int, default=128, metavar="P", help="prefill tokens each (default: 128)")
    prof.add_argument("--context", type=int, default=512, metavar="C", help="decode: cached tokens each (default: 512)")
    prof.add_argument("--png", default=None, metavar="FILE", help="write a roofline plot (needs kiln[profile])")
    prof.add_argument("--json", default=None, metavar="FILE", help="write the figures as JSON")
    _add_compile_options(prof)
    _add_trust_option(prof)

    serve = sub.add_parser(
        "serve",
        help="serve MODEL over an OpenAI-compatible HTTP API",
        description="Load MODEL and serve /v1/completions, /v1/chat/completions, /v1/models, "
        "/tokenize, /detokenize, /health, /version and /metrics until interrupted.",
    )
    serve.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1, loopback only)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    serve.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help="require `Authorization: Bearer KEY` on every route but /health (default: $KILN_API_KEY, else none)",
    )
    serve.add_argument(
        "--open-metrics", action="store_true", help="let /metrics answer without the API key (for a scraper)"
    )
    serve.add_argument(
        "--allowed-hosts",
        nargs="+",
        default=None,
        metavar="HOST",
        help="Host header names to answer besides the loopback ones (bound to loopback, no others are answered)",
    )
    serve.add_argument(
        "--served-model-name",
        default=None,
        metavar="NAME",
        help="the model name clients must send (default: MODEL's directory name)",
    )
    serve.add_argument(
        "--stall-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="abort a streaming request whose client has read nothing for S seconds (default: 60)",
    )
    serve.add_argument(
        "--max-request-seqs",
        type=int,
        default=64,
        metavar="N",
        help="most sequences (prompts x n) one request may start (default: 64)",
    )
    serve.add_argument(
        "--max-num-seqs", type=int, default=256, metavar="N", help="sequences batched per step (default: 256)"
    )
    serve.add_argument(
        "--num-kv-blocks",
        type=int,
        default=None,
        metavar="N",
        help="KV cache blocks (default: sized from max-num-seqs and max-model-len)",
    )
    serve.add_argument("--block-size", type=int, default=16, metavar="N", help="tokens per KV block (default: 16)")
    ray = serve.add_argument_group("replicas on Ray Serve (pip install 'kiln[ray]'; RAY_ADDRESS joins a cluster)")
    ray.add_argument("--ray", action="store_true", help="serve engine replicas on Ray Serve behind the same routes")
    ray.add_argument("--num-replicas", type=int, default=None, metavar="N", help="replicas (default: 1)")
    ray.add_argument("--min-replicas", type=int, default=None, metavar="N", help="autoscaling: fewest replicas")
    ray.add_argument("--max-replicas", type=int, default=None, metavar="N", help="autoscaling: most replicas")
    ray.add_argument(
        "--target-ongoing-requests", type=float, default=None, metavar="N", help="autoscaling: requests per replica"
    )
    _add_compile_options(serve)
    _add_memory_option(serve)
    _add_speculative_option(serve)
    _add_trust_option(serve)

    export = sub.add_parser(
        "export",
        help="export MODEL_DIR as an MLIR module via torch-mlir (optional extra)",
        description="Compile MODEL_DIR (reference graph), decompose kiln ops into core aten "
        "and write one MLIR function `forward` (prefill and decode: dynamic "
        "tokens, caches in and updated caches out; see "
        "kiln.compiler.export.mlir_export). "
        "Needs torch-mlir (`pip install 'kiln[mlir]'`).",
    )
    export.add_argument("model_dir", metavar="MODEL_DIR", help="a Hugging Face checkpoint directory")
    export.add_argument(
        "--format",
        default="linalg",
        choices=["torch", "linalg", "stablehlo", "tosa"],
        help="MLIR dialect level (default: linalg, i.e. linalg-on-tensors)",
    )
    export.add_argument("-o", "--output", required=True, metavar="FILE", help="the .mlir file to write")
    export.add_argument(
        "--block-size",
        type=int,
        default=16,
        metavar="N",
        help="tokens per KV block, fixed in the cache shapes (default: 16)",
    )
    export.add_argument(
        "--static",
        default=None,
        metavar="T,S,B,N",
        help="static functions prefill (T tokens, S seqs) and decode (S tokens), B blocks per "
        "sequence, N cache blocks, instead of one dynamic forward (tosa: always; "
        "default 128,4,8,33)",
    )
    export.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "float16", "bfloat16"],
        help="weight/activation dtype (default: the checkpoint's own)",
    )
    export.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        metavar="N",
        help="longest prompt+generation the module is planned for",
    )
    export.add_argument(
        "--device",
        default="cpu",
        metavar="DEVICE",
        help="where the weights load while the module is built (default: cpu)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `kiln` console script; returns the process exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help(sys.stderr)
        return NOT_BUILT
    from kiln import commands, demo

    commands.setup_logging()
    return {
        "demo": demo.demo,
        "compile": commands.compile_cmd,
        "generate": commands.generate,
        "bench": commands.bench,
        "serve": commands.serve,
        "export": commands.export,
        "profile": commands.profile,
    }[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
