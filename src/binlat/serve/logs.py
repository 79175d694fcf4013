"""Rate-limited server logs: a flood of bad connections or failing requests cannot fill the disk.

Each bad connection can make uvicorn, asyncio or the app log a warning or a traceback; a few thousand a second
wrote hundreds of MB. `rate_limited_logs()` puts a `RateLimitFilter` on the loggers the server writes through
while it runs: of the records at WARNING or above, at most `per_kind` of one kind (logger, level, first line of
the message, exception type) and `overall` in all pass per `window` seconds. The rest are counted, not written:
the next record of a kind that is let through says how many of its kind were dropped, and the server's last log
line sums up what was never reported. Records below WARNING (uvicorn's access lines) are not limited.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence

SERVER_LOGGERS = ("uvicorn.error", "uvicorn.access", "asyncio", "binlat.serve")
_OTHER = ("", 0, "(other kinds)", "")


class RateLimitFilter(logging.Filter):
    def __init__(
        self,
        per_kind: int = 10,
        overall: int = 50,
        window: float = 10.0,
        max_kinds: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ):
        super().__init__()
        self.per_kind, self.overall, self.window, self.max_kinds = per_kind, overall, window, max_kinds
        self.clock = clock
        self._lock = threading.Lock()
        self._start = clock()
        self._passed: dict[tuple, int] = {}  # this window's records let through, by kind
        self._total = 0
        self._dropped: dict[tuple, int] = {}  # dropped and not yet reported, by kind

    @staticmethod
    def kind(record: logging.LogRecord) -> tuple:
        first_line = str(record.msg).strip().split("\n", 1)[0][:120]
        error = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else ""
        return record.name, record.levelno, first_line, error

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        with self._lock:
            now = self.clock()
            if now - self._start >= self.window:
                self._start, self._total = now, 0
                self._passed.clear()
            key = self.kind(record)
            if key not in self._passed and len(self._passed) >= self.max_kinds:
                key = _OTHER
            if self._passed.get(key, 0) >= self.per_kind or self._total >= self.overall:
                if key not in self._dropped and len(self._dropped) >= self.max_kinds:
                    key = _OTHER
                self._dropped[key] = self._dropped.get(key, 0) + 1
                return False
            self._passed[key] = self._passed.get(key, 0) + 1
            self._total += 1
            dropped = self._dropped.pop(key, 0)
        if dropped:
            record.msg = f"{record.msg} [and {dropped} more like this, not logged: rate limit]"
        return True

    def summary(self) -> str | None:
        """One line naming the dropped records not reported yet (and forgetting them), or None."""
        with self._lock:
            dropped, self._dropped = self._dropped, {}
        if not dropped:
            return None
        kinds = sorted(dropped.items(), key=lambda item: -item[1])
        shown = "; ".join(
            f"{n} x {name} {logging.getLevelName(level)} {text!r}" + (f" ({error})" if error else "")
            for (name, level, text, error), n in kinds[:5]
        )
        more = f"; {len(kinds) - 5} more kinds" if len(kinds) > 5 else ""
        return f"{sum(dropped.values())} log records were not written (rate limit): {shown}{more}"


@contextlib.contextmanager
def rate_limited_logs(loggers: Sequence[str] = SERVER_LOGGERS, **limits) -> Iterator[RateLimitFilter]:
    """A RateLimitFilter on `loggers` for the duration; at the end, the summary of what it dropped is logged."""
    limiter = RateLimitFilter(**limits)
    targets = [logging.getLogger(name) for name in loggers]
    for logger in targets:
        logger.addFilter(limiter)
    try:
        yield limiter
    finally:
        for logger in targets:
            logger.removeFilter(limiter)
        report(limiter)


def report(limiter: RateLimitFilter) -> None:
    """Log the summary of what `limiter` dropped and has not reported yet, if anything."""
    summary = limiter.summary()
    if summary:
        logging.getLogger("binlat.serve").warning("binlat: %s", summary)
