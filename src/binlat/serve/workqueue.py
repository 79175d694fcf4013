"""The work queue: generations run in a fixed pool of worker threads, and a bounded number of requests may be
admitted (reading their body, waiting or running) at once; one more is answered 429 straight away instead of piling
up.

A request is admitted once, as a `Ticket`: before its body is read when it has one (guards.AdmissionMiddleware),
else when its work is submitted. When its client disconnects (`Ticket.cancel`), work that has not started is
dropped and its place freed at once; work that runs stops at the next forward call of a network made
`cancellable` (each diffusion step and each AR token calls it), and its place is freed when the thread is done.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ..pipeline import Pipeline
from .errors import ApiError, ClientGone

_job = threading.local()  # .ticket: the ticket whose work this worker thread runs
_hook_lock = threading.Lock()


class Ticket:
    """One admitted request's place in the queue, held until its work ends (or until it is released unused)."""

    def __init__(self, queue: WorkQueue):
        self._queue = queue
        self._held = True
        self.future: Future | None = None
        self.gone = threading.Event()  # set when the client has disconnected

    def release(self) -> None:
        """Give the place back (once; later calls do nothing)."""
        self._queue._release(self)

    def release_unless_submitted(self) -> None:
        """Give the place back if no work was submitted with it (submitted work gives it back when it ends)."""
        if self.future is None:
            self.release()

    def cancel(self) -> None:
        """The client has gone: drop the work if it has not started (its place is freed by the future's done
        callback), else let `cancellable` networks stop it at their next forward call."""
        self.gone.set()
        if self.future is not None:
            self.future.cancel()


class WorkQueue:
    """A fixed pool of worker threads and a bound on admitted requests (reading a body, waiting or running). A job
    stays counted until its thread finishes, even if the client that asked for it has gone, so the bound always
    holds."""

    def __init__(self, max_concurrent: int, max_queue: int):
        self.max_concurrent, self.max_queue = max_concurrent, max_queue
        self._executor = ThreadPoolExecutor(max_workers=max_concurrent, thread_name_prefix="binlat-serve")
        self._lock = threading.Lock()
        self.admitted = 0
        self.running = 0

    def admit(self) -> Ticket:
        """A place in the queue, else a 429 ApiError."""
        with self._lock:
            if self.admitted >= self.max_queue:
                raise ApiError(
                    429,
                    f"server busy: {self.admitted} requests are already running or waiting "
                    f"(max_queue {self.max_queue}); retry shortly",
                    headers={"Retry-After": "1"},
                )
            self.admitted += 1
        return Ticket(self)

    def _release(self, ticket: Ticket) -> None:
        with self._lock:
            if ticket._held:
                ticket._held = False
                self.admitted -= 1

    def submit(self, fn: Callable[[], Any], ticket: Ticket | None = None) -> Future:
        """Run `fn` in a worker thread under `ticket` (admitted here when None); the future gives
        (result, seconds waited, seconds worked)."""
        ticket = ticket or self.admit()
        if ticket.future is not None:
            raise RuntimeError("a ticket runs one job")
        if ticket.gone.is_set():
            ticket.release()
            raise ClientGone()
        queued = time.perf_counter()

        def job() -> Any:
            try:
                if ticket.gone.is_set():
                    raise ClientGone()
                with self._lock:
                    self.running += 1
                _job.ticket = ticket
                try:
                    started = time.perf_counter()
                    return fn(), started - queued, time.perf_counter() - started
                finally:
                    _job.ticket = None
                    with self._lock:
                        self.running -= 1
            finally:
                ticket.release()

        try:
            ticket.future = self._executor.submit(job)
        except BaseException:
            ticket.release()
            raise
        # A job cancelled before it started never runs its own `finally`.
        ticket.future.add_done_callback(lambda f: ticket.release() if f.cancelled() else None)
        return ticket.future

    async def run(self, fn: Callable[[], Any], ticket: Ticket | None = None) -> tuple[Any, float, float]:
        """(result, seconds waited, seconds worked); ClientGone if the client disconnected first."""
        ticket = ticket or self.admit()
        future = self.submit(fn, ticket)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            if future.cancelled() and ticket.gone.is_set():  # dropped for a client that has gone
                raise ClientGone() from None
            raise

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _stop_if_client_gone(_module: Any, _args: Any) -> None:
    ticket = getattr(_job, "ticket", None)
    if ticket is not None and ticket.gone.is_set():
        raise ClientGone()


def cancellable(module: Any) -> Any:
    """`module` (a network a job calls once per step or token), with a forward pre-hook that stops the calling job
    when its client has gone; installed once, and a no-op outside the work queue's threads."""
    with _hook_lock:
        if hasattr(module, "register_forward_pre_hook") and not getattr(module, "_binlat_cancel_hook", False):
            module.register_forward_pre_hook(_stop_if_client_gone)
            module._binlat_cancel_hook = True
    return module


def serialise_text_encoder(pipe: Pipeline) -> None:
    """Fast tokenizers refuse concurrent calls ('Already borrowed'); with several workers, encode one at a time."""
    encoder: Any = pipe.text_encoder  # patched in place: a wrapped forward and a marker attribute
    if getattr(encoder, "_binlat_serve_lock", None) is not None:
        return
    lock, forward = threading.Lock(), encoder.forward

    def locked_forward(*args: Any, **kwargs: Any) -> Any:
        with lock:
            return forward(*args, **kwargs)

    encoder.forward = locked_forward
    encoder._binlat_serve_lock = lock
