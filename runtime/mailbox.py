"""One consumer's newest output: what a streaming client has not read yet, bounded to one item.

Outputs are cumulative (each holds everything generated so far), so a newer one replaces an unread older one
and nothing is lost: a client that reads slowly gets fewer, larger updates, and one that stops reading costs one
output's memory, not one per step. `unread_since` lets the engine abort a client that stopped reading.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any


class Mailbox:
    """Holds at most one undelivered item (an output or an exception) for one `generate` consumer."""

    def __init__(self) -> None:
        self._item: Any = None
        self._ready = asyncio.Event()
        self.unread_since: float | None = None  # when the oldest unread update arrived; None when all read

    def put(self, item: Any) -> None:
        """Deliver item, replacing an unread output; an exception is never replaced by a later output."""
        if isinstance(self._item, BaseException):
            return
        if self.unread_since is None:
            self.unread_since = time.monotonic()
        self._item = item
        self._ready.set()

    async def get(self) -> Any:
        await self._ready.wait()
        item, self._item = self._item, None
        self._ready.clear()
        self.unread_since = None
        return item
