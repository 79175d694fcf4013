"""What the files, values and runs part of the hostile-input catalogue (tests/test_hostile_files_*.py) shares
beyond tests/reliability_support.py: a CLI failure that must come after a run started and within a time limit,
and the argv of a tokenizer training run."""

from __future__ import annotations

import signal
from pathlib import Path

from reliability_support import Env


class RunDidNotEnd(BaseException):
    """Raised by the alarm in `fails_at_run_time` (a BaseException: the CLI's one-line handler lets it through)."""


def fails_at_run_time(env: Env, argv: list, *needles: str, code: int, seconds: int = 120) -> str:
    """A failure after a run started, within `seconds` (a run that never ends fails the case instead of hanging the
    suite): the exit code, no traceback, one error line and it is the last (a progress bar or warnings may come
    before it)."""

    def expire(*_):
        raise RunDidNotEnd(f"{argv[:2]} still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        rc, _, err = env.cli(*argv)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert rc == code, (rc, err)
    assert "Traceback" not in err, err
    lines = [line.strip("\r") for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("binlat")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def train_args(env: Env, run: Path, **over) -> list:
    return ["train", "tokenizer", "--config", env.train_config(**over), "--output", run]
