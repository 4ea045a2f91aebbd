"""Cold start: a fresh process from nothing to its first generated token, from an artifact vs an HF directory.

The artifact path (`kiln compile -o`) skips loading the HF model, torch.export and the passes; this measures
what that buys. Each run is a new Python process (`import kiln`, `kiln.LLM(path)`, one greedy token), the
two kinds interleaved so that machine noise hits both alike; medians are reported.

On a GPU (backend triton) a third kind, "artifact+cubins", is the artifact compiled with `--target cuda:<this
GPU>`: its kernels come from the artifact's cubins (codegen/aot.py) instead of Triton's JIT. Every process starts
with an empty Triton cache; "jit" counts the Triton kernels it compiled, decode steps run eagerly (no CUDA graph
capture) so that the count is the kernels of one prefill and one decode.

    python -m kiln.bench.cold_start [MODEL_DIR] [--repeats 3]

MODEL_DIR defaults to the demo Llama (random weights, built once and cached).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("import", "load", "first_token", "total")

# Runs in the child: times are from its first statement (interpreter start-up is only in "process"). "import" is
# torch and kiln's lazy top level, which both paths pay; "load" is everything kiln.LLM(path) does, the
# transformers/export/pass imports that only compiling needs included.
_CHILD = """
import json, sys, time
t0 = time.perf_counter()
import torch, kiln
from kiln.codegen.aot import JitCounter
t1 = time.perf_counter()
with JitCounter() as jit:  # Triton kernels compiled in this process (not loaded from a cache)
    llm = kiln.LLM(sys.argv[1], max_num_seqs=1, enforce_eager=True)
    t2 = time.perf_counter()
    llm.generate([[1, 5, 9, 33, 7]], kiln.SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
    t3 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "first_token": t3 - t2, "total": t3 - t0, "jit": jit.compiled}))
"""


def run_once(model: Path) -> dict[str, float]:
    """One fresh process, with an empty Triton cache of its own (what a new machine has); returns seconds per
    stage, the whole process wall time, and the Triton kernels it compiled."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kiln-triton-cache-") as cache:
        result = subprocess.run(
            [sys.executable, "-c", _CHILD, str(model)],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "TQDM_DISABLE": "1", "TRITON_CACHE_DIR": cache},
        )
    times = json.loads(result.stdout.strip().splitlines()[-1])
    times["process"] = time.perf_counter() - started
    return times


def versions() -> str:
    import torch
    import transformers

    import kiln

    return f"kiln {kiln.__version__}, torch {torch.__version__}, transformers {transformers.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", nargs="?", default=None, help="HF checkpoint directory (default: demo Llama)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per kind (default: 3)")
    args = parser.parse_args(argv)

    import kiln
    from kiln.compiler.export import artifact

    if args.model_dir is None:
        from kiln.models.testing import demo_checkpoint

        model_dir = demo_checkpoint()
    else:
        model_dir = Path(args.model_dir)
    import torch

    with tempfile.TemporaryDirectory(prefix="kiln-cold-start-") as tmp:
        art = Path(tmp) / "artifact"
        compiled = kiln.compile(str(model_dir))
        artifact.save(compiled, art)
        size = sum(p.stat().st_size for p in art.rglob("*") if p.is_file())
        kinds = {"hf directory": model_dir, "artifact": art}
        if torch.cuda.is_available() and compiled.backend == "triton":  # the GPU rows: the same with cubins
            major, minor = torch.cuda.get_device_capability()
            kinds["artifact+cubins"] = artifact.save(compiled, Path(tmp) / "cubins", target=f"cuda:{major}{minor}")
        runs: dict[str, list[dict[str, float]]] = {kind: [] for kind in kinds}
        for _ in range(args.repeats):
            for kind, path in kinds.items():
                runs[kind].append(run_once(path))

    print(f"model: {model_dir} (artifact {size / 2**20:.1f} MiB)")
    print(
        f"{versions()}; python {platform.python_version()}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs; median of {args.repeats} fresh processes each"
    )
    columns = (*STAGES, "process", "jit")
    header = "".join(f"{name:>13}" for name in columns)
    print(f"{'seconds':<16}{header}")
    medians = {kind: {k: statistics.median(r[k] for r in rs) for k in columns} for kind, rs in runs.items()}
    for kind, med in medians.items():
        print(f"{kind:<16}" + "".join(f"{med[k]:>13.3f}" for k in columns[:-1]) + f"{med['jit']:>13.0f}")
    if "artifact+cubins" not in runs:
        print("artifact+cubins: skipped (needs a CUDA GPU and backend triton); jit = Triton kernels compiled")
    hf, art_s = medians["hf directory"]["total"], medians["artifact"]["total"]
    print(
        f"load to first token: {medians['hf directory']['load'] + medians['hf directory']['first_token']:.3f} s "
        f"from the HF directory vs {medians['artifact']['load'] + medians['artifact']['first_token']:.3f} s "
        f"from the artifact; import to first token {hf / art_s:.1f}x faster"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
