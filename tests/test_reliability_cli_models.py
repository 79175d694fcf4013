"""The reliability catalogue, CLI part: model directories and checkpoints.

A model folder that is missing, lacks a weights file or its index, or holds a config with an unknown or mistyped
key, truncated or wrong-shaped weights fails `binlat generate` in one line naming the file; `convert-official`
refuses a pickle payload (it never runs) and leaves an existing output folder as it was; `binlat train` refuses a
bad config, and a `--resume` checkpoint that is missing, carries a pickle payload, is truncated or is of another
shape is only read, never changed, and no run folder is started. What every case asserts, Env and the fixtures:
tests/reliability_support.py.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from reliability_support import (  # noqa: F401
    Env,
    bundle,
    checkpoint,
    encoder,
    env,
    leftovers,
    new_catalogue,
    official_tokenizer,
    pipe,
    snapshot,
    write_payload,
)

pytestmark = pytest.mark.filterwarnings("ignore:`log_with=.*no supported trackers:UserWarning")
CASES, ENTRY_OF, case = new_catalogue()


# ============================================================================================================
# CLI: model directories and checkpoints


@case("cli-model-dir-does-not-exist", "binlat generate")
def _(env: Env) -> None:
    out = env.tmp / "out"
    env.cli_fails(env.generate_args("a cat", out=out, model=env.tmp / "no-model"), "does not exist", code=2)
    assert not list(out.glob("*.png"))


@case("cli-model-missing-weights-file", "binlat generate")
def _(env: Env) -> None:
    model = env.copy_bundle()
    (model / "tokenizer" / "model.safetensors").unlink()
    before, out = snapshot(model), env.tmp / "out"
    env.cli_fails(
        env.generate_args("a cat", out=out, model=model),
        "tokenizer/model.safetensors",
        "weights file not found",
        code=1,
    )
    assert snapshot(model) == before and not list(out.glob("*.png"))


@case("cli-model-missing-index", "binlat generate")
def _(env: Env) -> None:
    model = env.copy_bundle()
    (model / "model_index.json").unlink()
    env.cli_fails(env.generate_args("a cat", out=env.tmp / "out", model=model), "missing model_index.json", code=1)


@case("cli-model-config-unknown-key", "binlat generate")
def _(env: Env) -> None:
    model = env.copy_bundle()
    config = model / "diffusion" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "num_layerz": 3}))
    env.cli_fails(
        env.generate_args("a cat", out=env.tmp / "out", model=model),
        "unknown key(s) ['num_layerz']",
        "diffusion/config.json",
        code=2,
    )


@case("cli-model-config-mistyped-key", "binlat generate")
def _(env: Env) -> None:
    model = env.copy_bundle()
    config = model / "tokenizer" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "num_bits": "32"}))
    env.cli_fails(
        env.generate_args("a cat", out=env.tmp / "out", model=model), "'num_bits' must be an integer, got '32'", code=2
    )


@case("cli-model-truncated-safetensors", "binlat generate")
def _(env: Env) -> None:
    model = env.copy_bundle()
    weights = model / "diffusion" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    env.cli_fails(
        env.generate_args("a cat", out=env.tmp / "out", model=model),
        "not a valid safetensors file (truncated or corrupt?)",
        code=1,
    )


@case("cli-model-wrong-shape-weights", "binlat generate")
def _(env: Env) -> None:
    model = env.copy_bundle()
    weights = model / "ar" / "model.safetensors"
    state = load_file(weights)
    key = sorted(k for k, v in state.items() if v.ndim == 2)[0]
    state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])
    save_file(state, weights)
    env.cli_fails(
        env.generate_args("a cat", out=env.tmp / "out", model=model) + ["--generator", "ar"],
        "wrong shapes",
        key,
        code=1,
    )


@case("cli-convert-official-pickle-payload-refused", "binlat convert-official")
def _(env: Env) -> None:
    config, _ = official_tokenizer(env.tmp)
    marker, weights, out = env.tmp / "MARKER", env.tmp / "bae.pt", env.tmp / "converted"
    write_payload(weights, marker, lambda p: {"module": {"encoder.patch_embedder.weight": p}})
    env.cli_fails(
        ["convert-official", "--kind", "tokenizer", "--config", config, "--weights", weights, "--out", out],
        "refused to load",
        "bae.pt",
        code=1,
    )
    assert not marker.exists(), "the pickle payload ran"
    assert not out.exists() and not leftovers(env.tmp)


@case("cli-convert-official-wrong-shape-over-existing-dir", "binlat convert-official")
def _(env: Env) -> None:
    config, state = official_tokenizer(env.tmp)
    key = sorted(k for k, v in state.items() if v.ndim == 2)[0]
    state[key] = torch.zeros(3, 3)
    weights = env.tmp / "bae.safetensors"
    save_file(state, weights)
    out = Path(shutil.copytree(env.bundle / "tokenizer", env.tmp / "existing"))
    before = snapshot(out)
    env.cli_fails(
        ["convert-official", "--kind", "tokenizer", "--config", config, "--weights", weights, "--out", out],
        "wrong shapes",
        key,
        code=1,
    )
    assert snapshot(out) == before and not leftovers(env.tmp)


@case("cli-train-config-unknown-key", "binlat train")
def _(env: Env) -> None:
    run = env.tmp / "run"
    env.cli_fails(
        ["train", "tokenizer", "--config", env.train_config(learning_rate=1e-3), "--output", run],
        "unknown key(s) ['learning_rate']",
        code=2,
    )
    assert not run.exists()


@case("cli-train-config-mistyped-key", "binlat train")
def _(env: Env) -> None:
    run = env.tmp / "run"
    env.cli_fails(
        ["train", "tokenizer", "--config", env.train_config(max_steps="12"), "--output", run],
        "'max_steps' must be an integer, got '12'",
        code=2,
    )
    assert not run.exists()


@case("cli-train-resume-latest-without-checkpoint", "binlat train")
def _(env: Env) -> None:
    run = env.tmp / "run"
    env.cli_fails(
        ["train", "tokenizer", "--config", env.train_config(), "--output", run, "--resume", "latest"],
        "--resume latest: no checkpoint",
        code=1,
    )
    assert not (run / "config.json").exists() and not (run / "checkpoints").exists()


def _resume_fails(env: Env, damage: Callable[[Path], None], *needles: str) -> Path:
    ckpt = Path(shutil.copytree(env.checkpoint, env.tmp / "ckpt"))
    damage(ckpt)
    before, run = snapshot(ckpt), env.tmp / "run"
    handlers = list(logging.getLogger("binlat").handlers)
    env.cli_fails(
        ["train", "tokenizer", "--config", env.train_config(), "--output", run, "--resume", ckpt], *needles, code=1
    )
    assert snapshot(ckpt) == before  # the checkpoint is only read
    assert not (run / "config.json").exists() and not (run / "checkpoints").exists()
    assert logging.getLogger("binlat").handlers == handlers  # the failed run detached its log file
    return ckpt


@case("cli-train-resume-checkpoint-pickle-payload-refused", "binlat train")
def _(env: Env) -> None:
    marker = env.tmp / "MARKER"
    _resume_fails(
        env,
        lambda ckpt: write_payload(ckpt / "optimizer.pt", marker, lambda p: {"state": {0: p}, "param_groups": []}),
        "optimizer.pt",
        "refused to load",
    )
    assert not marker.exists(), "the pickle payload ran"


@case("cli-train-resume-truncated-checkpoint", "binlat train")
def _(env: Env) -> None:
    def cut(ckpt: Path) -> None:
        weights = ckpt / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])

    _resume_fails(env, cut, "model.safetensors", "not a valid safetensors file")


@case("cli-train-resume-checkpoint-of-another-shape", "binlat train")
def _(env: Env) -> None:
    def reshape(ckpt: Path) -> None:
        state = load_file(ckpt / "ema.safetensors")
        key = sorted(k for k, v in state.items() if v.ndim == 2)[0]
        state[key] = torch.zeros(2, 2)
        save_file(state, ckpt / "ema.safetensors")

    _resume_fails(env, reshape, "ema.safetensors", "wrong shapes")


# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_catalogue(name: str, env: Env) -> None:
    CASES[name](env)
