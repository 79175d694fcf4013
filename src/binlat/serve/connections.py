"""The HTTP connection protocol: uvicorn's h11 protocol with the two bounds uvicorn has no setting for.

- A header timeout. uvicorn closes a kept-alive connection that stays silent for `timeout_keep_alive`, but a
  connection that never sends a byte, or sends its headers a byte at a time, is never closed. Here a connection
  must complete a request's line and headers within `header_timeout` seconds of opening or of its previous
  response (the body then has its own timeout, guards.AdmissionMiddleware's).
- A hard bound on open connections. uvicorn's `limit_concurrency` answers 503 to a request that arrives while as
  many connections are open, but still accepts every connection, so idle ones pile up until the process runs out
  of file descriptors and the accept loop fails. Here a connection that arrives while `max_open` are open is
  closed at once, before anything is read from it.

`protocol_class(header_timeout, max_open)` makes the class to pass as uvicorn.Config(http=...).
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol


class BoundedH11Protocol(H11Protocol):
    header_timeout: float = 10.0
    max_open: int = 128

    # uvicorn passes its asyncio.Transport (the base declares BaseTransport)
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        self._timed_cycle: object | None = None  # the cycle whose headers the timer waits for
        self._refused = len(self.connections) >= self.max_open
        if self._refused:
            transport.close()
            return
        super().connection_made(transport)
        self._start_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:
            return
        self._stop_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._refused:
            super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        if self._header_timer is not None and self.cycle is not self._timed_cycle:
            self._stop_header_timer()  # a new request's headers are in

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._start_header_timer()  # before uvicorn looks at a pipelined next request
        super().on_response_complete()

    def _start_header_timer(self) -> None:
        self._stop_header_timer()
        self._timed_cycle = self.cycle
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_time_up)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_time_up(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()


def protocol_class(header_timeout: float, max_open: int) -> type[BoundedH11Protocol]:
    return type("BinlatH11Protocol", (BoundedH11Protocol,), {"header_timeout": header_timeout, "max_open": max_open})
