"""uvicorn's HTTP/1.1 protocol with a deadline for request headers, against slowloris clients.

uvicorn closes idle keep-alive connections but waits forever for a request whose headers trickle in, so a
few hundred such connections hold the server's sockets. Here a connection whose next request's headers are
not complete `seconds` after the connection opened (or after the previous response) is closed. The body has
its own deadline (`ServerLimits.body_timeout`). Imported only by `serve`: uvicorn is not needed otherwise.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol


def header_timeout_protocol(seconds: float) -> type[H11Protocol]:
    """An H11Protocol subclass that closes a connection whose request headers take longer than `seconds`."""
    if not seconds > 0:
        raise ValueError(f"header timeout must be a positive number of seconds, got {seconds!r}")

    class HeaderDeadlineH11(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(seconds, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _headers_too_slow(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a request's headers arrived: its cycle started
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderDeadlineH11
