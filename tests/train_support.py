"""What the training-engine test files (tests/test_train_*.py) share: the tiny tokenizer and generator configs
and their builders, readers of a run folder (metrics, checkpoints, state), a tensor comparison, a hook that
replaces the loss at chosen steps, and the fixtures: one intra-op thread and detached run logs (autouse: a test
file imports them to have them), and a trained, exported tokenizer the generator runs start from (module scope:
each file that imports it trains its own)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from binlat.config import config_from_dict
from binlat.train.checkpoints import export_run
from binlat.train.config import TrainConfig
from binlat.train.engine import Trainer
from binlat.train.tasks import GeneratorTask, TokenizerTask
from tiny_models import TINY_TOKENIZER_MODEL

TOKENIZER_MODEL = TINY_TOKENIZER_MODEL
GENERATOR_MODEL = {"num_layers": 2, "num_heads": 2, "head_dim": 16}
CHECKPOINT_FILES = {"model.safetensors", "ema.safetensors", "optimizer.pt", "state.json"}


def tokenizer_dict(**over) -> dict:
    d = {
        "kind": "tokenizer",
        "model": dict(TOKENIZER_MODEL),
        "image_size": 64,
        "batch_size": 8,
        "max_steps": 6,
        "warmup_steps": 2,
        "save_every": 3,
        "log_every": 2,
        "trackers": [],
    }
    return {**d, **over}


def generator_dict(kind: str, tokenizer_dir: Path, **over) -> dict:
    d = {
        "kind": kind,
        "model": dict(GENERATOR_MODEL),
        "image_size": 64,
        "batch_size": 8,
        "max_steps": 4,
        "warmup_steps": 1,
        "save_every": 2,
        "log_every": 1,
        "trackers": [],
        "generator": {"tokenizer": str(tokenizer_dir), "sample_steps": 3},
    }
    return {**d, **over}


def make_cfg(d: dict) -> TrainConfig:
    return config_from_dict(TrainConfig, d)


def cfg_for(kind: str, tokenizer_dir: Path, **over) -> TrainConfig:
    return make_cfg(tokenizer_dict(**over) if kind == "tokenizer" else generator_dict(kind, tokenizer_dir, **over))


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:08d}"


def state_of(run: Path, step: int) -> dict:
    return json.loads((step_dir(run, step) / "state.json").read_text())


def assert_same_tensors(a: dict, b: dict, exact: bool = True, **tol) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], msg=k, **tol)


def task_class(kind: str):
    return TokenizerTask if kind == "tokenizer" else GeneratorTask


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These models are tiny: one intra-op thread is faster than two and steadier on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _detach_run_logs():
    """Trainer attaches a log.txt handler to the `binlat` logger; detach what a test attached once it ends."""
    root = logging.getLogger("binlat")
    before, level = list(root.handlers), root.level
    yield
    for h in [h for h in root.handlers if h not in before]:
        root.removeHandler(h)
        h.close()
    root.setLevel(level)


@pytest.fixture(scope="module")
def tokenizer_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("tokenizer-run") / "run"
    Trainer(make_cfg(tokenizer_dict()), run).train()
    for h in [
        h
        for h in logging.getLogger("binlat").handlers
        if isinstance(h, logging.FileHandler) and Path(h.baseFilename).is_relative_to(run)
    ]:
        logging.getLogger("binlat").removeHandler(h)
        h.close()
    return run


@pytest.fixture(scope="module")
def tokenizer_dir(tokenizer_run, tmp_path_factory) -> Path:
    return export_run(tokenizer_run, tmp_path_factory.mktemp("tokenizer-export") / "tokenizer")


def fail_at(monkeypatch, kind: str, steps, make):
    """Wrap the task loss: at the given step numbers, replace the result with make(loss, step)."""
    cls = task_class(kind)
    original = cls.loss

    def loss(self, model, batch, step, gens):
        value, extra = original(self, model, batch, step, gens)
        return (make(value, step), extra) if step in steps else (value, extra)

    monkeypatch.setattr(cls, "loss", loss)
