"""Shared pieces of bench/gpu.py: model shapes, the results recorder, timers and per-peer time limits.

Every figure is appended to the results file the moment it exists (one JSON line) and echoed on stdout, so a
crash or a timeout later in the run loses nothing measured before it.
"""

from __future__ import annotations

import json
import signal
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it is used: bench/gpu.py's driver process never needs it
    import torch

LLAMA_1B = dict(
    hidden_size=2048,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    intermediate_size=8192,
    num_hidden_layers=16,
    vocab_size=128256,
    max_position_embeddings=4096,
    rope_theta=500000.0,
    tie_word_embeddings=True,
)
TINY = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
    num_hidden_layers=2,
    vocab_size=512,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)
# No EOS: every engine then generates exactly max_tokens without masking a token (HF's min_new_tokens would
# mask EOS, kiln's ignore_eos would not, and greedy paths would part there).
SPECIAL_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=None)
FIRST_ID = 3  # random prompt ids start above the special ids


def llama_config(tiny: bool) -> Any:
    """The benchmark model's config: Llama-3.2-1B-shaped, or the tiny shape of the CPU smoke mode."""
    import transformers

    return transformers.LlamaConfig(**(TINY if tiny else LLAMA_1B), **SPECIAL_IDS)


def build_model(tiny: bool, device: str, dtype: torch.dtype) -> Any:
    """Random weights from a fixed seed, created directly on `device`."""
    import torch
    import transformers

    torch.manual_seed(0)
    with torch.device(device):
        return transformers.LlamaForCausalLM(llama_config(tiny)).to(dtype).eval()


class PeerTimeout(BaseException):
    """Raised by SIGALRM when a peer overruns. BaseException, so that library code catching Exception (HF's
    generate_batch logs and swallows those) cannot hide it."""


class Recorder:
    """Appends one JSON line per figure to the results file and prints a readable line, both flushed."""

    def __init__(self, path: Path, run: str, phase: str) -> None:
        self.path, self.run, self.phase = path, run, phase

    def write(self, kind: str, name: str, **fields: Any) -> None:
        line = {
            "kind": kind,
            "run": self.run,
            "phase": self.phase,
            "name": name,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **fields,
        }
        with self.path.open("a") as f:
            f.write(json.dumps(line, default=str) + "\n")
        shown = " ".join(f"{k}={_short(v)}" for k, v in fields.items() if k not in ("traceback", "log_tail"))
        print(f"[{self.phase}] {kind} {name}: {shown}", flush=True)

    def figure(self, name: str, **fields: Any) -> None:
        self.write("figure", name, **fields)

    def status(self, name: str, status: str, seconds: float, **fields: Any) -> None:
        """status: ok, failed, timeout or skipped (with a reason)."""
        self.write("status", name, status=status, seconds=round(seconds, 2), **fields)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    return text if len(text) <= 160 else text[:157] + "..."


def guarded(rec: Recorder, name: str, limit_s: float, fn: Callable[[], Any]) -> Any:
    """Run one peer under its own time limit; record ok / failed / timeout and return its result (None if not ok).

    SIGALRM interrupts Python code only: a hung kernel is left to the phase's subprocess timeout in bench/gpu.py.
    """
    if limit_s < 1:
        rec.status(name, "skipped", 0.0, reason="no time left in the phase budget")
        return None

    def alarm(signum: int, frame: Any) -> None:
        raise PeerTimeout(f"{name} ran past its {limit_s:.0f} s limit")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, limit_s)
    start = time.perf_counter()
    result, status, fields = None, "ok", {}
    try:
        result = fn()
    except PeerTimeout as exc:
        status, fields = "timeout", {"error": str(exc)}
    except Exception as exc:  # a failed peer is a result; the next one still runs
        status, fields = (
            "failed",
            {"error": f"{type(exc).__name__}: {exc}"[:2000], "traceback": traceback.format_exc()[-4000:]},
        )
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    rec.status(name, status, time.perf_counter() - start, **fields)
    return result


def time_left(args: Any) -> float:
    """Seconds until the phase's deadline (set by bench/gpu.py a little before it kills the phase)."""
    return max(0.0, args.deadline - time.time())


def peer(args: Any, rec: Recorder, name: str, fn: Callable[[], Any]) -> Any:
    """One peer of the current phase: skipped if --skip names it, else guarded by min(its limit, time left)."""
    key = f"{rec.phase}.{name}"
    if key in args.skip:
        rec.status(name, "skipped", 0.0, reason=f"--skip {key}" + (" (a --quick default)" if args.quick else ""))
        return None
    return guarded(rec, name, min(args.limits[key], time_left(args)), fn)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def wall(fn: Callable[[], Any], device: str) -> float:
    """Seconds for one call, device work included."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median_time(fn: Callable[[], Any], device: str, iters: int, warmup: int) -> float:
    """Median seconds per call: CUDA events on a GPU (do_bench's method, without autotune), perf_counter on CPU."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            times.append(wall(fn, device))
    return sorted(times)[len(times) // 2]
