"""The work queue: generations run in a fixed pool of worker threads, and a bounded number of requests may be
admitted (running or waiting) at once; one more is answered 429 straight away instead of piling up."""
from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ..pipeline import Pipeline
from .errors import ApiError


class WorkQueue:
    """A fixed pool of worker threads and a bound on admitted jobs (running + waiting). A job stays counted
    until its thread finishes, even if the client that asked for it has gone, so the bound always holds."""

    def __init__(self, max_concurrent: int, max_queue: int):
        self.max_concurrent, self.max_queue = max_concurrent, max_queue
        self._executor = ThreadPoolExecutor(max_workers=max_concurrent, thread_name_prefix="binlat-serve")
        self._lock = threading.Lock()
        self.admitted = 0
        self.running = 0

    def submit(self, fn: Callable[[], Any]) -> Future:
        with self._lock:
            if self.admitted >= self.max_queue:
                raise ApiError(429, f"server busy: {self.admitted} requests are already running or waiting "
                                    f"(max_queue {self.max_queue}); retry shortly", headers={"Retry-After": "1"})
            self.admitted += 1
        queued = time.perf_counter()

        def job() -> Any:
            with self._lock:
                self.running += 1
            started = time.perf_counter()
            try:
                return fn(), started - queued, time.perf_counter() - started
            finally:
                with self._lock:
                    self.running -= 1
                    self.admitted -= 1

        try:
            return self._executor.submit(job)
        except BaseException:
            with self._lock:
                self.admitted -= 1
            raise

    async def run(self, fn: Callable[[], Any]) -> tuple[Any, float, float]:
        """(result, seconds waited, seconds worked)."""
        return await asyncio.wrap_future(self.submit(fn))

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def serialise_text_encoder(pipe: Pipeline) -> None:
    """Fast tokenizers refuse concurrent calls ('Already borrowed'); with several workers, encode one at a time."""
    encoder = pipe.text_encoder
    if getattr(encoder, "_binlat_serve_lock", None) is not None:
        return
    lock, forward = threading.Lock(), encoder.forward

    def locked_forward(*args: Any, **kwargs: Any) -> Any:
        with lock:
            return forward(*args, **kwargs)

    encoder.forward = locked_forward
    encoder._binlat_serve_lock = lock
