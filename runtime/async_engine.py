"""`AsyncLLMEngine`: stream tokens to many asyncio consumers from one shared batch.

One background task drives `LLMEngine.step()` in the event loop itself (no threads, so adds, aborts and steps
never race) and yields to the loop between steps so that consumers receive their outputs. A consumer that
stops listening, by closing its generator or by being cancelled, aborts its request right away; one that stops
reading (a stalled client) holds one output in its mailbox, and after `stall_timeout` seconds is aborted, its
blocks freed, and told so.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from typing import Any

from .engine import LLMEngine
from .mailbox import Mailbox
from .outputs import RequestOutput
from .sampling_params import SamplingParams


class AsyncLLMEngine:
    """Wraps an LLMEngine; `generate` is an async iterator of cumulative RequestOutputs."""

    def __init__(self, engine: LLMEngine, stall_timeout: float = 60.0) -> None:
        if not isinstance(stall_timeout, (int, float)) or not stall_timeout > 0:
            raise ValueError(f"stall_timeout must be a positive number of seconds, got {stall_timeout!r}")
        self.engine = engine
        self.stall_timeout = float(stall_timeout)
        self._queues: dict[str, Mailbox] = {}
        self._next_stall_check = 0.0
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ids = itertools.count()

    @classmethod
    def from_model(cls, model: Any, stall_timeout: float = 60.0, **options: Any) -> AsyncLLMEngine:
        """Compile (unless already compiled) and build the engine, as `LLM` does."""
        from .llm import LLM

        return cls(LLM(model, **options).engine, stall_timeout)

    async def generate(
        self,
        prompt: str | list[int],
        sampling_params: SamplingParams | dict | None = None,
        request_id: str | None = None,
        cache_salt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's output after each step that changes it; the last one has finished=True.
        cache_salt: see LLMEngine.make_request."""
        request_id = request_id if request_id is not None else f"async-{next(self._ids)}"
        if request_id in self._queues:
            raise ValueError(f"request_id {request_id!r} is already in use")
        request = self.engine.make_request(request_id, prompt, sampling_params, cache_salt=cache_salt)
        queue = Mailbox()
        self._queues[request_id] = queue
        self.engine.enqueue(request)
        self._ensure_loop()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                if item.error is not None:
                    raise RuntimeError(f"request {request_id} failed: {item.error}")
                yield item
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self.engine.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._queues.pop(request_id, None)
        self.engine.abort(request_id)

    def _ensure_loop(self) -> None:
        """Start the stepping task on the running event loop (again, if an earlier loop has gone)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._loop_task is None or self._loop_task.done():
            self._loop = loop
            self._wakeup = asyncio.Event()
            self._loop_task = loop.create_task(self._run(self._wakeup))
        assert self._wakeup is not None
        self._wakeup.set()

    async def _run(self, wakeup: asyncio.Event) -> None:
        """Step while there is work, sleep on the wakeup event otherwise."""
        while True:
            if not self.engine.has_unfinished_requests():
                wakeup.clear()
                await wakeup.wait()
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # fail every listener rather than leave them hanging
                for queue in self._queues.values():
                    queue.put(exc)
                self.engine.abort(list(self.engine.requests))
                continue
            for out in outputs:
                listener = self._queues.get(out.request_id)
                if listener is not None:
                    listener.put(out)
            self._abort_stalled()
            await asyncio.sleep(0)

    def _abort_stalled(self) -> None:
        """Abort the requests whose consumer has left an output unread for stall_timeout (checked every second,
        or four times per timeout when it is shorter)."""
        now = time.monotonic()
        if now < self._next_stall_check:
            return
        self._next_stall_check = now + min(1.0, self.stall_timeout / 4)
        for request_id, mailbox in list(self._queues.items()):
            if mailbox.unread_since is not None and now - mailbox.unread_since > self.stall_timeout:
                self.engine.abort(request_id)
                mailbox.put(
                    TimeoutError(f"request {request_id} aborted: its client read nothing for {self.stall_timeout:g} s")
                )

    async def shutdown(self) -> None:
        """Stop the background loop and abort whatever is still in flight."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
        self.engine.abort(list(self.engine.requests))
        if self.engine.in_flight is not None:  # a step launched ahead (async scheduling): collect and drop it
            self.engine.step()
        self._loop_task = None
