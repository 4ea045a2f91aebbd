"""GPU benchmark of kiln in one run: (1) the GPU tests, (2) kernel bandwidth against a device-to-device copy,
(3) decode tokens/s of a Llama-3.2-1B-shaped random bf16 model against HF eager and HF + torch.compile, (4) the
whole engine (`kiln.LLM.generate`) on an offline workload against HF `generate` and `generate_batch`, (5) extras:
`kiln profile`, cold start with and without cubins, TP=1 vs TP=2 where there are two GPUs (bench/gpu_extras.py).

GPU time is scarce and a failure must not cost what was already measured: every phase runs in its own
subprocess under its own time limit (and every peer inside it under its own), so a crash, a sticky CUDA error or
a timeout costs that phase only and the next one still runs. Each figure is appended to <out>/gpu_<card>.jsonl
(one JSON line, after a header line with versions, date and command) the moment it is measured, and printed.

    bench/gpu.sh [--quick] [--phases tests,bandwidth,decode,engine,extras] [--skip decode.hf_compile,...] [--out DIR]
    bench/gpu.sh --device cpu --tiny     # smoke run of every phase on the CPU with a tiny model
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from .gpu_common import Recorder

REPO = Path(__file__).resolve().parent.parent
# phase -> peer -> seconds it may take (full run, --quick); a phase's limit is the sum of its peers' + start-up.
LIMITS = {
    "tests": {"tests": (900, 50)},
    "bandwidth": {"bandwidth": (240, 45)},
    "decode": {"kiln": (420, 75), "hf_eager": (180, 30), "hf_compile": (600, 180)},
    "engine": {"checkpoint": (180, 45), "kiln": (600, 120), "hf_static": (600, 60), "hf_generate_batch": (600, 90)},
    "extras": {"profile": (300, 90), "cold_start": (600, 240), "tensor_parallel": (300, 120)},
}
PHASES = tuple(LIMITS)
PEERS = [f"{phase}.{name}" for phase, peers in LIMITS.items() for name in peers]
QUICK_SKIP = "decode.hf_compile"  # torch.compile's inductor compile alone takes minutes
STARTUP_S = 30  # a phase subprocess's imports and CUDA start-up
QUICK_BUDGET_S = 285  # --quick: the whole run, so that it ends within 5 minutes
CARD_PROBE = """import json, torch
cuda = torch.cuda.is_available()
print(json.dumps({"card": torch.cuda.get_device_name() if cuda else None, "cuda_available": cuda,
                  "cuda": torch.version.cuda, "torch": torch.__version__}))"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="64 requests, 32 decode steps, short limits, <5 min")
    p.add_argument("--tiny", action="store_true", help="tiny model and workload (hidden 64, 2 layers, vocab 512)")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    p.add_argument("--dtype", default=None, help="default bfloat16 on a GPU, float32 on CPU")
    p.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset of " + ",".join(PHASES))
    p.add_argument("--steps", type=int, default=None, help="decode steps (128; --quick 32; --tiny 8)")
    p.add_argument("--batch", type=int, default=1, help="decode batch size")
    p.add_argument("--num-requests", type=int, default=None, help="engine workload size (256; --quick 64)")
    p.add_argument("--prompt-len", type=int, nargs=2, default=None, metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, nargs=2, default=None, metavar=("MIN", "MAX"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hf-batch-size", type=int, default=None, help="HF static batch size (64)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="kiln's max_num_seqs (128)")
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.5,
        help="kiln's; below its 0.9 so the HF peers after it in the same process keep room",
    )
    p.add_argument(
        "--skip",
        default=None,
        help=f"comma-separated peers to leave out, of {','.join(PEERS)} "
        f"(--quick: {QUICK_SKIP}; --skip '' runs them all)",
    )
    p.add_argument(
        "--tests",
        nargs="+",
        default=None,
        help="test paths, relative to the checkout (default tests/codegen + tests/**/*gpu* test files)",
    )
    p.add_argument("--budget-s", type=float, default=None, help="limit for the whole run (--quick: 285)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--work-dir", type=Path, default=None, help="checkpoint cache (default: a temp dir)")
    for hidden in ("--child", "--results", "--run", "--deadline"):  # parent -> phase subprocess
        p.add_argument(hidden, help=argparse.SUPPRESS)
    return resolve(p.parse_args(argv))


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults that depend on --quick, --tiny and --device."""
    import tempfile

    def pick(value: Any, full: Any, quick: Any, tiny: Any) -> Any:
        return value if value is not None else tiny if args.tiny else quick if args.quick else full

    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    args.steps = pick(args.steps, 128, 32, 8)
    args.num_requests = pick(args.num_requests, 256, 64, 8)
    args.prompt_len = tuple(pick(args.prompt_len, (64, 512), (64, 512), (8, 48)))
    args.output_len = tuple(pick(args.output_len, (32, 256), (32, 256), (4, 16)))
    args.hf_batch_size = pick(args.hf_batch_size, 64, 64, 4)
    args.max_num_seqs = pick(args.max_num_seqs, 128, 128, 8)
    args.skip = [p for p in pick(args.skip, "", QUICK_SKIP, "").split(",") if p]
    args.budget_s = args.budget_s or (QUICK_BUDGET_S if args.quick else None)
    args.limits = {
        f"{phase}.{name}": v[1] if args.quick else v[0] for phase, peers in LIMITS.items() for name, v in peers.items()
    }
    args.out = args.out.resolve()  # phase subprocesses run in the checkout, wherever this one was started
    args.work_dir = (args.work_dir or Path(tempfile.gettempdir()) / "kiln-bench-gpu").resolve()
    args.phases = [p for p in args.phases.split(",") if p]
    for option, given, known in (("--phases", args.phases, PHASES), ("--skip", args.skip, PEERS)):
        unknown = ", ".join(sorted(set(given) - set(known)))
        if unknown:
            raise SystemExit(f"{option}: unknown {unknown}; choose from {', '.join(known)}")
    return args


def default_tests() -> list[str]:
    """tests/codegen plus every test file with "gpu" in its name (not this benchmark's own CPU smoke test)."""
    extra = sorted(
        str(p.relative_to(REPO))
        for p in (REPO / "tests").rglob("*gpu*.py")
        if p.name.startswith("test_") or p.name.endswith("_test.py")
        if "codegen" not in p.parts and not p.name.startswith("test_bench")
    )
    return ["tests/codegen", *extra]


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def run_group(
    cmd: list[str], limit_s: float, log: Path, env: dict[str, str], stdout_to_log: bool
) -> tuple[str, int | None]:
    """Run cmd in its own process group, stderr (and stdout if asked) to `log`; then end whatever is left of the
    group (on timeout the phase itself; else stray compile workers). Returns (ok | failed | timeout, returncode)."""
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=out if stdout_to_log else None, stderr=out, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=max(limit_s, 1))
            return ("ok" if rc == 0 else "failed"), rc
        except subprocess.TimeoutExpired:
            return "timeout", None
        finally:
            _kill_group(proc)


def _kill_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


def tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def pytest_summary(log: Path) -> dict[str, Any]:
    """Counts from pytest's last line ("3 failed, 20 passed, 2 skipped in 31.2s") and its -rfEs lines."""
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    last = next((line for line in reversed(lines) if re.search(r"\bin [\d.]+s\b", line)), "")
    counts = {
        word.rstrip("s") if word == "errors" else word: int(n)
        for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)", last)
    }
    notes = [line[:300] for line in lines if line.startswith(("SKIPPED", "FAILED", "ERROR"))]
    return {"summary": last.strip("= "), **counts, "short_summary": notes[:40]}


def probe(args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    """Versions from package metadata; the card's name from a subprocess, so that this process never holds a
    CUDA context (and a CPU run never imports torch here)."""
    info: dict[str, Any] = {"python": platform.python_version()}
    for package in ("torch", "triton", "transformers"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = None
    if args.device == "cpu":
        return info | {"card": "cpu-" + (platform.processor() or platform.machine())}
    proc = subprocess.run(
        [sys.executable, "-c", CARD_PROBE], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    if proc.returncode != 0:
        return info | {"card": "unknown", "probe_error": proc.stderr[-2000:]}
    return info | json.loads(proc.stdout.strip().splitlines()[-1])


def child_env(args: argparse.Namespace, phase: str) -> dict[str, str]:
    """Kernels compile for the GPU; only the CPU smoke run's bandwidth phase needs Triton's interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if args.device == "cpu" and phase == "bandwidth":
        env["TRITON_INTERPRET"] = "1"
    return env | {"PYTHONUNBUFFERED": "1"}


def phase_limit(args: argparse.Namespace, phase: str) -> float:
    """Its peers' limits (those not skipped) plus start-up; 0 when every peer is skipped."""
    peers = [f"{phase}.{name}" for name in LIMITS[phase] if f"{phase}.{name}" not in args.skip]
    return sum(args.limits[p] for p in peers) + (STARTUP_S if peers and phase != "tests" else 0)


def run_phase(
    args: argparse.Namespace,
    argv: list[str],
    phase: str,
    rec: Recorder,
    results: Path,
    run: str,
    deadline: float | None,
) -> None:
    """One phase as a subprocess, recorded as ok / failed / timeout / skipped with the tail of its log."""
    limit_s = phase_limit(args, phase)
    if limit_s == 0:
        rec.status(phase, "skipped", 0.0, reason="--skip names all its peers")
        return
    if deadline is not None:
        limit_s = min(limit_s, deadline - time.time())
    if limit_s < 10:
        rec.status(phase, "skipped", 0.0, reason="the run's --budget-s is spent")
        return
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{results.stem}_{run}_{phase}.log"
    env = child_env(args, phase)
    print(f"== phase {phase} (limit {limit_s:.0f} s, log {log})", flush=True)
    start = time.perf_counter()
    if phase == "tests":
        paths = args.tests or default_tests()
        cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", *paths]
        status, rc = run_group(cmd, limit_s, log, env, stdout_to_log=True)
        rec.figure("pytest", returncode=rc, paths=paths, **pytest_summary(log))
        if rc == 1:  # some tests failed: a figure, not a broken phase (2-5: interrupted, usage, nothing collected)
            status = "ok"
    else:
        cmd = [
            sys.executable,
            "-m",
            "kiln.bench.gpu",
            *argv,
            "--child",
            phase,
            "--results",
            str(results),
            "--run",
            run,
            "--deadline",
            str(time.time() + limit_s - 5),
        ]
        status, rc = run_group(cmd, limit_s, log, env, stdout_to_log=False)
    fields: dict[str, Any] = {"limit_s": round(limit_s), "returncode": rc, "log": str(log)}
    if status != "ok":
        fields["log_tail"] = tail(log)
        print("\n".join(fields["log_tail"].splitlines()[-15:]), flush=True)
    rec.status(phase, status, time.perf_counter() - start, **fields)


def child(args: argparse.Namespace) -> None:
    """Inside a phase subprocess: run its peers, each under min(its own limit, what the phase has left)."""
    import torch

    if args.device.startswith("cuda"):  # CUDA events and synchronize act on the current device
        torch.cuda.set_device(args.device)
    args.torch_dtype = getattr(torch, args.dtype)
    args.deadline = float(args.deadline)
    rec = Recorder(Path(args.results), args.run, args.child)
    if args.child == "bandwidth":
        from .gpu_kernels import bandwidth

        bandwidth(args, rec)
    elif args.child == "decode":
        from .gpu_kernels import decode

        decode(args, rec)
    elif args.child == "extras":
        from .gpu_extras import extras

        extras(args, rec)
    else:
        from .gpu_engine import engine

        engine(args, rec)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child:
        return child(args)
    deadline = time.time() + args.budget_s if args.budget_s else None
    env = child_env(args, "probe")
    info = probe(args, env)
    if args.device != "cpu" and not info.get("cuda_available"):
        raise SystemExit(f"no CUDA device ({info}); for the CPU smoke run use --device cpu --tiny")
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / f"gpu_{slug(info['card'])}.jsonl"
    run = time.strftime("%Y%m%d-%H%M%S")
    rec = Recorder(results, run, "run")
    settings = {k: v for k, v in vars(args).items() if k not in ("child", "results", "run", "deadline")}
    command = shlex.join([sys.executable, "-m", "kiln.bench.gpu", *argv])
    rec.write(
        "header", "gpu_bench", date=time.strftime("%Y-%m-%dT%H:%M:%S%z"), command=command, **info, settings=settings
    )
    for phase in args.phases:
        rec.phase = phase
        run_phase(args, argv, phase, rec, results, run, deadline)
    print(f"results appended to {results} (run {run})", flush=True)


if __name__ == "__main__":
    main()
