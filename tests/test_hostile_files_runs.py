"""Runs that always end: part of the files, values and runs catalogue of issue 29 (its items 4, 5, 6 and part of 8).

Data whose every sample is bad, an empty shard, a manifest of missing files, a long bad stretch: the run stops
with one line naming the data, and its log stays small; micro-batches of only missing files skip their step;
skipped samples are logged ever more sparsely; a real process reading an all-bad shard ends under a memory cap.

Cases are registered with @case("surface-what", ENTRY) as in the reliability catalogue (tests/test_reliability_*.py),
whose Env, fixtures and helpers they use (tests/reliability_support.py); tests/test_hostile_files_entries.py checks
the cli/api/data entries of this file and its siblings against that module's derivations.
"""

from __future__ import annotations

import io
import json
import os
import resource
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from binlat.config import config_from_dict
from binlat.data.base import skip_logged
from binlat.train.checkpoints import read_state
from binlat.train.config import TrainConfig
from binlat.train.engine import Trainer
from hostile_files_support import fails_at_run_time, train_args
from reliability_support import (  # noqa: F401
    TRAIN_CONFIG,
    Env,
    encoder,
    env,
    new_catalogue,
    noise_png,
)

pytestmark = pytest.mark.filterwarnings("ignore:`log_with=.*no supported trackers:UserWarning")
CASES, ENTRY_OF, case = new_catalogue()


def shard(path: Path, images: list[bytes]) -> Path:
    """A WebDataset shard: sample i is images[i] (bytes, good or not) with caption "a shape"."""
    with tarfile.open(path, "w") as tar:
        for i, data in enumerate(images):
            for name, body in ((f"{i:05d}.png", data), (f"{i:05d}.txt", b"a shape")):
                info = tarfile.TarInfo(name)
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
    return path


def skip_lines(run: Path) -> list[str]:
    return [line for line in (run / "log.txt").read_text().splitlines() if "skipping sample" in line]


# ============================================================================================================
# Runs that always end


@case("train-shard-every-sample-bad", "binlat train")
def _(env: Env) -> None:
    tar, run = shard(env.tmp / "bad.tar", [b"not an image"] * 300), env.tmp / "run"
    fails_at_run_time(
        env,
        train_args(env, run, data=str(tar), max_steps=5),
        "every sample of",
        "bad.tar",
        "in a whole pass was skipped (300",
        code=1,
    )
    logged = skip_lines(run)  # the first 20 one by one, then the 100th: not 300 lines, nor one per pass for ever
    assert len(logged) == 21 and "100 samples skipped so far" in logged[-1], logged


@case("train-empty-shard", "binlat train")
def _(env: Env) -> None:
    tar, run = shard(env.tmp / "empty.tar", []), env.tmp / "run"
    fails_at_run_time(env, train_args(env, run, data=str(tar)), "empty.tar gave no samples in a whole pass", code=1)
    assert not (run / "checkpoints").exists()


@case("train-manifest-no-existing-file", "binlat train")
def _(env: Env) -> None:
    manifest, run = env.tmp / "data.jsonl", env.tmp / "run"
    manifest.write_text('{"path": "gone.png", "caption": "a"}\n{"path": "also-gone.png", "caption": "b"}\n')
    fails_at_run_time(
        env, train_args(env, run, data=str(manifest)), "none of the 2 samples of", "data.jsonl", "gone.png", code=1
    )  # was KeyError: 'image'


@case("train-bad-stretch-past-max-consecutive-skips", "binlat train")
def _(env: Env) -> None:
    tar = shard(env.tmp / "data.tar", [b"bad"] * 80 + [noise_png(64, i) for i in range(16)])
    run = env.tmp / "bounded"
    fails_at_run_time(
        env,
        train_args(env, run, data=str(tar), max_consecutive_skips=50),
        "samples in a row could not be read from",
        "data.tar",
        "max_consecutive_skips=50",
        code=1,
    )
    rc, _, err = env.cli(*train_args(env, env.tmp / "loose", data=str(tar)))  # the default bound lets 80 pass
    assert rc == 0, err
    assert read_state(env.tmp / "loose" / "checkpoints" / "step-00000001")["step"] == 1


@case("train-micro-batches-of-only-missing-files-skip-their-step", "Trainer")
def _(env: Env) -> None:
    (env.tmp / "good.png").write_bytes(noise_png(64))
    manifest = env.tmp / "data.jsonl"
    files = ["good.png"] + [f"gone{i}.png" for i in range(7)]
    manifest.write_text("".join(json.dumps({"path": p}) + "\n" for p in files))
    cfg = config_from_dict(
        TrainConfig, {**TRAIN_CONFIG, "data": str(manifest), "batch_size": 2, "max_steps": 6, "save_every": 6}
    )
    Trainer(cfg, env.tmp / "run").train()  # one good file in 8: at least 3 of every 4 batches hold none
    state = read_state(env.tmp / "run" / "checkpoints" / "step-00000006")
    assert state["step"] == 6 and 3 <= state["skipped_steps"] < 6, state


@case("data-skip-log-schedule", "WebDatasetShards")
def _(env: Env) -> None:
    assert [n for n in range(1, 100_001) if skip_logged(n)] == list(range(1, 21)) + [100, 1000, 10_000, 100_000]


@case("train-all-bad-shard-subprocess-memory-capped", "binlat train")
def _(env: Env) -> None:
    """A real process under a 6 GiB address-space cap and a time limit: 3,000 bad samples, default bound."""
    tar, run = shard(env.tmp / "bad.tar", [b"x" * 64] * 3000), env.tmp / "run"
    cap = lambda: resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))  # noqa: E731
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "binlat.cli",
            "train",
            "tokenizer",
            "--config",
            env.train_config(),
            "--data",
            tar,
            "--output",
            run,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=cap,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert last.startswith("binlat: error: 1024 samples in a row could not be read from") and "bad.tar" in last
    assert len((run / "log.txt").read_text().splitlines()) < 40


# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_files(name: str, env: Env) -> None:
    CASES[name](env)
