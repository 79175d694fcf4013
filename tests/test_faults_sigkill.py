"""Fault injection: training killed with SIGKILL at random moments, ten times in a row, then resumed to the end,
ends bit-identical to an uninterrupted run, with every checkpoint left complete.

Everything runs on this machine, in subprocesses of `python -m binlat.cli`."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from binlat.io import load_safetensors
from faults_support import TINY, assert_checkpoints_intact, child_env, complete_checkpoints

pytestmark = pytest.mark.filterwarnings("ignore:`log_with=.*no supported trackers:UserWarning")


TMP_CHECKPOINT = re.compile(r"^\.step-\d{8}\.tmp-")
LEFTOVER = re.compile(r"\.(tmp|old|del)-")
RESUMED = re.compile(r"resumed from (\S+) at step (\d+)")


def train_cmd(config: Path, run: Path, resume: bool) -> list[str]:
    return [
        sys.executable,
        "-m",
        "binlat.cli",
        "train",
        "tokenizer",
        "--config",
        str(config),
        "--output",
        str(run),
        *(["--resume", "latest"] if resume else []),
    ]


def latest_step(run: Path) -> int:
    found = complete_checkpoints(run)
    return int(found[-1].name[5:]) if found else 0


def inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def wait_until(predicate, proc: subprocess.Popen, timeout: float, poll: float = 0.002) -> bool:
    """Poll until predicate() holds (True) or the process exits / time runs out (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    return False


def test_training_survives_ten_sigkills_and_ends_bit_identical(tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    logs = tmp_path / "logs"
    logs.mkdir()
    env = child_env()

    # The reference: the same config, never interrupted (runs alongside the kill loop).
    reference = tmp_path / "reference"
    with open(logs / "reference.txt", "wb") as out:
        ref_proc = subprocess.Popen(train_cmd(config, reference, False), env=env, stdout=out, stderr=out, cwd=tmp_path)

    run = tmp_path / "run"
    rng = random.Random(20240608)
    modes = [
        "checkpoint",
        "random",
        "startup",
        "checkpoint",
        "random",
        "checkpoint",
        "startup",
        "random",
        "checkpoint",
        "random",
    ]
    history = []
    try:
        for attempt, mode in enumerate(modes):
            assert_checkpoints_intact(run)  # what this attempt will resume from is whole
            found = complete_checkpoints(run)
            resume_from = found[-1] if found else None
            config_ino = inode(run / "config.json")
            with open(logs / f"attempt-{attempt}.txt", "wb") as out:
                proc = subprocess.Popen(
                    train_cmd(config, run, resume_from is not None), env=env, stdout=out, stderr=out, cwd=tmp_path
                )
            # config.json is rewritten (a new inode) once the checkpoint is loaded, just before the first step.
            started = lambda: inode(run / "config.json") not in (None, config_ino)  # noqa: E731
            base = latest_step(run)

            def progressed(n: int) -> bool:  # this attempt has completed n more checkpoints
                return latest_step(run) - base >= n

            try:
                # An attempt completes at most one or two new checkpoints, whatever the machine's speed, so all ten
                # kills land before the run's end.
                if mode == "startup":  # in imports, model building or checkpoint loading; at the latest as it starts
                    wait_until(started, proc, rng.uniform(0.2, 3.5))
                elif mode == "random":  # a random moment of training
                    assert wait_until(started, proc, 120), f"attempt {attempt} never started training"
                    wait_until(lambda: progressed(1), proc, rng.uniform(0.0, 0.6))
                else:  # while the first or second checkpoint of this attempt is being written
                    assert wait_until(started, proc, 120), f"attempt {attempt} never started training"
                    nth, seen = rng.choice([1, 2]), set()

                    def writing() -> bool:
                        root = run / "checkpoints"
                        names = {n for n in (os.listdir(root) if root.is_dir() else ()) if TMP_CHECKPOINT.match(n)}
                        seen.update(names)
                        return (len(seen) >= nth and bool(names)) or progressed(nth)

                    wait_until(writing, proc, 60, poll=0.0005)
                proc.send_signal(signal.SIGKILL)
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait(30)
            root = run / "checkpoints"
            during_write = root.is_dir() and any(TMP_CHECKPOINT.match(n) for n in os.listdir(root))
            history.append(
                {
                    "attempt": attempt,
                    "mode": mode,
                    "rc": proc.returncode,
                    "during_write": during_write,
                    "resume_from": resume_from.name if resume_from else None,
                    "latest_after": (complete_checkpoints(run) or [Path("none")])[-1].name,
                }
            )
            tail = (logs / f"attempt-{attempt}.txt").read_text()[-2000:]
            assert proc.returncode == -signal.SIGKILL, (history[-1], tail)  # killed, not finished or crashed

        assert_checkpoints_intact(run)
        assert sum(h["during_write"] for h in history) >= 1, history  # some kills landed inside a checkpoint write
        reached = complete_checkpoints(run)
        assert latest_step(run) < TINY["max_steps"], history  # the final attempt still has work to do

        # The last, uninterrupted attempt finishes the run.
        final = subprocess.run(
            train_cmd(config, run, bool(reached)), env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path
        )
        assert final.returncode == 0, final.stderr[-3000:]
        assert f"at step {TINY['max_steps']}" in final.stdout
        assert ref_proc.wait(180) == 0, (logs / "reference.txt").read_text()[-3000:]
    finally:
        if ref_proc.poll() is None:
            ref_proc.kill()
            ref_proc.wait(30)

    # Every resume started from the newest intact checkpoint that existed when it was launched.
    resumes = RESUMED.findall((run / "log.txt").read_text())
    expected = [h["resume_from"] for h in history if h["resume_from"]]
    assert resumes, history
    for path, step in resumes:
        assert Path(path).name == f"step-{int(step):08d}"
    assert {Path(p).name for p, _ in resumes} <= set(expected) | {reached[-1].name if reached else None}

    assert_checkpoints_intact(run)
    assert not [p for p in run.rglob("*") if LEFTOVER.search(p.name)], "temporary files or folders remain"
    last = f"step-{TINY['max_steps']:08d}"
    assert [p.name for p in complete_checkpoints(run)][-1] == last
    for name in ("model.safetensors", "ema.safetensors"):
        ours = load_safetensors(run / "checkpoints" / last / name)
        theirs = load_safetensors(reference / "checkpoints" / last / name)
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), (name, key)
