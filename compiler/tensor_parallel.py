"""`kiln.compile(..., tensor_parallel_size=N)`: rank 0's share of the model, driving ranks 1..N-1.

The engine sees an ordinary `CompiledModel` (rank 0's): its KV layout is one rank's (so memory budgets are per
device), and each `forward` first announces the step to the workers, then runs rank 0's share; the logits come
back whole (the graph all-gathers them), so sampling runs on rank 0 alone.
"""

from __future__ import annotations

import atexit
import weakref
from pathlib import Path
from typing import Any

import torch

from kiln.ops.metadata import AttentionMetadata

from .compiled import CompiledModel
from .tp_workers import (
    COLLECTIVE_TIMEOUT_S,
    WorkerDiedError,
    Workers,
    announce,
    cache_header,
    free_address,
    join_group,
    leave_group,
    pack_step,
    rank_device,
    share_cores,
)

COMPILE_TIMEOUT_S = 600.0


class TensorParallelModel(CompiledModel):
    """Rank 0 of a tensor-parallel group: a CompiledModel whose steps also run on the workers."""

    def __init__(self, local: CompiledModel, workers: Workers, control: Any) -> None:
        self.__dict__.update(local.__dict__)
        self.tensor_parallel_size = workers.address.size
        self._workers, self._control = workers, control
        self._closed = False
        self._finalizer = weakref.finalize(self, _close, workers)
        atexit.register(self.shutdown)

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> list[torch.Tensor]:
        self._guard(lambda: announce(self._control, cache_header(num_blocks, block_size)))
        return super().allocate_kv_cache(num_blocks, block_size)

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, kv_caches: list[torch.Tensor]
    ) -> torch.Tensor:
        header, payload = pack_step(input_ids, positions, meta)
        self._guard(lambda: announce(self._control, header, payload))
        return self._guard(lambda: CompiledModel.forward(self, input_ids, positions, meta, kv_caches))

    __call__ = forward

    def _guard(self, run: Any) -> Any:
        """Run a step with the group. Any failure is fatal (WorkerDiedError): the other ranks are left inside the
        step's collectives, so the group cannot run another step; a dead worker is named."""
        if self._closed:
            raise WorkerDiedError("this tensor-parallel model was shut down")
        self._workers.check()
        try:
            return run()
        except RuntimeError as err:
            self._workers.check()  # a worker died: say which
            raise WorkerDiedError(f"a tensor-parallel step failed, and the ranks are out of step now: {err}") from err

    def check_health(self) -> None:
        """Raise WorkerDiedError if a rank has exited."""
        self._workers.check()

    def shutdown(self) -> None:
        """Stop the workers and leave the group; no process is left behind. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._workers.stop(graceful=self._workers.alive())
        leave_group()
        self._finalizer.detach()
        atexit.unregister(self.shutdown)


def _close(workers: Workers) -> None:
    workers.stop(graceful=False)


def compile_parallel(model: str | Path, size: int, settings: dict[str, Any]) -> TensorParallelModel:
    """Start ranks 1..size-1, compile rank 0's share here, and return it once every rank is ready. On CPUs each
    rank, this process included, then uses its share of the cores (`torch.set_num_threads`)."""
    from kiln.passes.shard import ShardSpec

    from .compile_shard import compile_shard

    if str(settings.get("device")).startswith("cuda") and torch.cuda.device_count() < size:
        raise ValueError(f"tensor_parallel_size: {size} ranks need {size} GPUs; torch sees {torch.cuda.device_count()}")
    device = rank_device(settings.get("device", "auto"), 0)
    address = free_address(size, str(device))
    workers = Workers(str(model), address, settings)
    share_cores(address)
    try:
        group, control = join_group(address, 0)
        workers.control = control
        local = compile_shard(model, ShardSpec(0, size, group), **{**settings, "device": device})
        workers.wait_ready(COMPILE_TIMEOUT_S + COLLECTIVE_TIMEOUT_S)
    except BaseException as err:
        workers.stop(graceful=False)
        leave_group()
        if isinstance(err, RuntimeError) and not isinstance(err, WorkerDiedError):
            workers.check()  # a worker that died while the group formed or compiled: say which
        raise
    return TensorParallelModel(local, workers, control)
