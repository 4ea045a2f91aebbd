"""What the codegen tests share. Without a GPU the kernels run in Triton's interpreter: tests/conftest.py sets
TRITON_INTERPRET before anything imports Triton."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Any

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Per dtype (atol, rtol) for a kernel that rounds once against a reference that may round per op.
TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


def poisoned(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An output buffer full of NaN, so an element the kernel forgets to write fails the comparison."""
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def randn(*shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    atol, rtol = TOLERANCES[expected.dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def in_clean_processes(script: str, args: list[Any]) -> list[Any]:
    """Run `script` once per argument (passed as JSON in argv[1]), concurrently, each in a Python process
    without TRITON_INTERPRET: once this process imported Triton under the interpreter, the real compiler cannot
    run in it. Each run prints its result as JSON on its last line. Output goes to files, not pipes, so that no
    process waits on a full pipe while another is being read."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    outputs = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in args]
    procs = [
        subprocess.Popen([sys.executable, "-c", script, json.dumps(arg)], env=env, text=True, stdout=out, stderr=err)
        for arg, (out, err) in zip(args, outputs)
    ]
    results = []
    for proc, (out, err) in zip(procs, outputs):
        with out, err:
            returncode = proc.wait()
            out.seek(0)
            err.seek(0)
            assert returncode == 0, err.read()[-4000:]
            results.append(json.loads(out.read().strip().splitlines()[-1]))
    return results


def launched_at(records: list[dict[str, Any]], kernel: str, step: str) -> dict[str, Any]:
    """The cross-compile record of `kernel` that `step` launches: a kernel compiled once is named plainly, one
    compiled in variants is named by the first step of each (numbered when several start there)."""
    variant = re.compile(rf"{re.escape(kernel)}_(decode|prefill)_\d+(_\d+)?")
    return next(r for r in records if step in r["steps"] and (r["name"] == kernel or variant.fullmatch(r["name"])))
