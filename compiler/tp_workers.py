"""The processes of a tensor-parallel group: rank 0 is the caller (engine, scheduler, sampler); ranks 1.. are
workers started here, each compiling its own share of the model and then running every step rank 0 announces.

Rank 0 broadcasts each step's inputs as two int64 tensors over a gloo group (a fixed header, then the ids,
positions and attention metadata packed into one payload); the model's own collectives run over the default
group (gloo on CPUs, NCCL on GPUs). Every collective has a timeout, and rank 0 checks that its workers are alive
before each step, so a rank that dies makes the engine fail with the rank's name and exit code instead of a hang.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from kiln.ops.metadata import AttentionMetadata

# How long a collective may wait for the other ranks: a rank that died is reported well within a minute.
COLLECTIVE_TIMEOUT_S = float(os.environ.get("KILN_TP_TIMEOUT_S", "30"))
# What rank 0 announces (header[0]).
_STEP, _CACHE, _STOP = 0, 1, 2
_HEADER = 8


class WorkerDiedError(RuntimeError):
    """A tensor-parallel rank stopped: the model cannot run without its share."""

    fatal = True  # the engine stops instead of failing one step's requests and going on


@dataclass(frozen=True)
class GroupAddress:
    """Where the ranks meet (a TCP store on this host) and on which backend."""

    init_method: str
    backend: str
    size: int


def free_address(size: int, device: str) -> GroupAddress:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if device.startswith("cuda") else "gloo"
    return GroupAddress(f"tcp://127.0.0.1:{port}", backend, size)


def rank_device(device: Any, rank: int) -> Any:
    """Each rank's device: its own GPU (cuda:rank) on GPUs, the CPU otherwise."""
    name = str(device)
    if name in ("auto", "cuda") or name.startswith("cuda"):
        if torch.cuda.is_available():
            return f"cuda:{rank}"
        if name != "auto":
            raise ValueError(f"device: {device!r} was asked for but torch sees no CUDA GPU")
    return "cpu" if name == "auto" else device


def share_cores(address: GroupAddress) -> None:
    """On CPUs the ranks share this machine's cores: each takes its part, so that N ranks do not run N times as
    many threads as there are cores."""
    if address.backend == "gloo":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // address.size))


def join_group(address: GroupAddress, rank: int) -> tuple[str, Any]:
    """Join the default group (the model's collectives) and a gloo group for rank 0's announcements; returns the
    default group's name, which the graph's collectives name."""
    if address.backend == "nccl":
        torch.cuda.set_device(rank)
    timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    dist.init_process_group(
        address.backend, init_method=address.init_method, rank=rank, world_size=address.size, timeout=timeout
    )
    control = dist.new_group(backend="gloo", timeout=timeout) if address.backend != "gloo" else dist.group.WORLD
    assert dist.group.WORLD is not None
    return dist.group.WORLD.group_name, control


def leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def pack_step(input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> list[torch.Tensor]:
    """The step as [header, payload] int64 CPU tensors."""
    tensors = [input_ids, positions, *meta.graph_inputs()]
    flat = [t.reshape(-1).to("cpu", torch.int64) for t in tensors]
    rows, width = meta.block_tables.shape
    header = torch.tensor(
        [_STEP, input_ids.numel(), rows, width, meta.seq_lens.numel(), meta.logits_indices.numel(),
         -1 if meta.max_query_len is None else meta.max_query_len, sum(f.numel() for f in flat)],
        dtype=torch.int64,
    )  # fmt: skip
    return [header, torch.cat(flat)]


def unpack_step(header: torch.Tensor, payload: torch.Tensor, device: Any) -> tuple[Any, ...]:
    tokens, rows, width, seqs, logits, max_query = (int(v) for v in header[1:7])
    sizes = [tokens, tokens, tokens, rows * width, seqs, seqs + 1, logits]
    parts = list(torch.split(payload.to(device), sizes))
    meta = AttentionMetadata(
        slot_mapping=parts[2],
        block_tables=parts[3].view(rows, width).to(torch.int32),
        seq_lens=parts[4].to(torch.int32),
        query_start_loc=parts[5].to(torch.int32),
        logits_indices=parts[6],
        max_query_len=None if max_query < 0 else max_query,
    )
    return parts[0], parts[1], meta


def announce(control: Any, header: torch.Tensor, payload: torch.Tensor | None = None) -> None:
    """Rank 0: send an announcement to every worker."""
    dist.broadcast(header, src=0, group=control)
    if payload is not None:
        dist.broadcast(payload, src=0, group=control)


def _worker(rank: int, address: GroupAddress, model: str, settings: dict[str, Any], status: Path) -> None:
    """A worker's life: join, compile its share, then run what rank 0 announces until told to stop."""
    from kiln.passes.shard import ShardSpec

    from .compile_shard import compile_shard

    try:
        share_cores(address)
        group, control = join_group(address, rank)
        settings = {**settings, "device": rank_device(settings.get("device", "auto"), rank)}
        compiled = compile_shard(model, ShardSpec(rank, address.size, group), **settings)
        (status / f"rank{rank}.ready").touch()
        caches: list[torch.Tensor] = []
        header = torch.empty(_HEADER, dtype=torch.int64)
        while True:
            dist.broadcast(header, src=0, group=control)
            kind = int(header[0])
            if kind == _STOP:
                break
            if kind == _CACHE:
                caches = compiled.allocate_kv_cache(int(header[1]), int(header[2]))
                continue
            payload = torch.empty(int(header[7]), dtype=torch.int64)
            dist.broadcast(payload, src=0, group=control)
            input_ids, positions, meta = unpack_step(header, payload, compiled.device)
            compiled.forward(input_ids, positions, meta, caches)
    except BaseException:
        (status / f"rank{rank}.error").write_text(traceback.format_exc())
        raise
    finally:
        leave_group()


def main() -> None:
    """Entry point of a worker process (`python -c`): its arguments come as one JSON document in argv."""
    args = json.loads(sys.argv[1])
    address = GroupAddress(**args["address"])
    _worker(args["rank"], address, args["model"], args["settings"], Path(args["status"]))


class Workers:
    """Ranks 1.. as processes, started and stopped together; rank 0's side of the group.

    Workers are fresh interpreters (`python -c`), not multiprocessing children: a user's script needs no
    `if __name__ == "__main__"` guard, since nothing re-imports it. Each worker marks a status file when its share
    is compiled, or leaves its traceback there when it fails.
    """

    def __init__(self, model: str, address: GroupAddress, settings: dict[str, Any]) -> None:
        self.address = address
        self.status = Path(tempfile.mkdtemp(prefix="kiln-tp-"))
        plain = {k: str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v for k, v in settings.items()}
        self.procs = []
        for rank in range(1, address.size):
            args = {
                "rank": rank,
                "address": asdict(address),
                "model": model,
                "settings": plain,
                "status": str(self.status),
            }
            code = "from kiln.compiler.tp_workers import main; main()"
            self.procs.append(subprocess.Popen([sys.executable, "-c", code, json.dumps(args)]))
        self.control: Any = None

    def check(self) -> None:
        """Raise if any worker has exited (with its own traceback when it left one)."""
        for rank, proc in enumerate(self.procs, start=1):
            if proc.poll() is not None:
                error = self.status / f"rank{rank}.error"
                said = f":\n{error.read_text()}" if error.exists() else ""
                raise WorkerDiedError(
                    f"tensor-parallel rank {rank} (pid {proc.pid}) exited with code {proc.returncode}{said}; "
                    "the model cannot run without its share"
                )

    def alive(self) -> bool:
        return all(proc.poll() is None for proc in self.procs)

    def wait_ready(self, timeout_s: float) -> None:
        """Block until every worker compiled its share; raise the first failure."""
        deadline = time.monotonic() + timeout_s
        while not all((self.status / f"rank{rank}.ready").exists() for rank in range(1, self.address.size)):
            self.check()
            if time.monotonic() > deadline:
                raise WorkerDiedError(f"tensor-parallel workers did not compile within {timeout_s:.0f} s")
            time.sleep(0.05)

    def stop(self, graceful: bool) -> None:
        """Tell the workers to stop (when the group still works), then make sure no process is left."""
        if graceful and self.control is not None:
            with contextlib.suppress(RuntimeError):
                announce(self.control, torch.tensor([_STOP] + [0] * (_HEADER - 1), dtype=torch.int64))
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10 if graceful else 0.1)
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)
        shutil.rmtree(self.status, ignore_errors=True)


def cache_header(num_blocks: int, block_size: int) -> torch.Tensor:
    return torch.tensor([_CACHE, num_blocks, block_size] + [0] * (_HEADER - 3), dtype=torch.int64)
