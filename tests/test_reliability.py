"""The reliability catalogue: every way a user can hand binlat something wrong, in one parametrised suite.

Each case feeds one bad input to one surface and asserts two things:
  * a clear, specific refusal:
      - CLI (`binlat.cli.main`, in-process): non-zero exit, exactly one stderr line, starting with "binlat",
        no traceback;
      - Python API: ValueError / ConfigError / WeightsError / OSError (or ImageLoadError) with a message that
        names the problem;
      - server (FastAPI TestClient over `create_app(random tiny pipeline, LIMITS)`): a 4xx JSON {"error": ...}
        naming the field, and nothing left admitted in the work queue;
      - data readers: the bad sample is skipped and counted, the stream goes on;
  * nothing lost or half-written where files are involved: output folders hold no partial PNG or temp file,
    an existing model directory / metadata.jsonl / checkpoint is byte-for-byte unchanged.

Some entries document deliberate non-errors (a 100,000-character prompt is truncated with a warning by the API
and CLI; CMYK, grayscale, alpha and 16-bit images load as the expected RGB).

Cases are registered with @case("surface-what", ENTRY) below, ENTRY naming the entry point the bad input goes
to ("binlat generate", "Pipeline.__call__", "POST /v1/generate", "ManifestDataset"); `pytest -k catalogue` runs
them all, and test_catalogue_is_complete checks that every entry point of the package has at least one case.
"""

from __future__ import annotations

import argparse
import errno
import inspect
import io
import json
import logging
import math
import os
import re
import shlex
import shutil
import struct
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.utils.data import IterableDataset

import binlat
import binlat.data.readers as readers_mod
import binlat.editing as editing
import binlat.modeling as modeling_mod
import binlat.official as official_mod
import binlat.pipeline as pipeline_mod
from binlat.cli import build_parser, main
from binlat.config import ConfigError, config_from_dict, config_to_dict
from binlat.data.readers import ImageFolderDataset, ManifestDataset, WebDatasetShards, expand_shards, make_dataset
from binlat.data.transforms import ImageLoadError, ImageTransform, load_image, to_rgb
from binlat.generators import ARTransformer, DiffusionTransformer
from binlat.io import WeightsError
from binlat.official import (
    _TOKENIZER_KEYS,
    build_official,
    convert_config,
    convert_official,
    load_official_weights,
    official_name,
    read_official_config,
)
from binlat.pipeline import Pipeline
from binlat.serve import ServeLimits, create_app
from binlat.text import TextEncoder
from binlat.tokenizer import BinaryTokenizer, TokenizerConfig
from binlat.train.config import TrainConfig
from binlat.train.engine import Trainer

pytestmark = pytest.mark.filterwarnings("ignore:`log_with=.*no supported trackers:UserWarning")

LOCAL = "http://localhost"  # the server answers only to loopback Host names (TestClient's own is "testserver")
LIMITS = ServeLimits(
    max_concurrent=1, max_queue=4, max_body_bytes=1_000_000, max_n=4, max_steps=8, max_prompt_chars=1000, max_size=128
)
LONG_PROMPT = ("a red circle above a blue square " * 3200)[:100_000]
TOKENIZER_MODEL = {
    "patch_size": 8,
    "num_tokens": 16,
    "num_bits": 16,
    "encoder_layers": 1,
    "encoder_heads": 2,
    "encoder_head_dim": 16,
    "decoder_layers": 1,
    "decoder_heads": 2,
    "decoder_head_dim": 16,
    "rope_axes_dims": [4, 6, 6],
    "downsample_after": [0],
    "upsample_after": [0],
}
TRAIN_CONFIG = {
    "kind": "tokenizer",
    "model": TOKENIZER_MODEL,
    "image_size": 64,
    "batch_size": 8,
    "max_steps": 1,
    "warmup_steps": 1,
    "save_every": 1,
    "log_every": 1,
    "trackers": [],
}
LEFTOVER = re.compile(r"\.(tmp|old|del)-|^\.write-test-")


# ------------------------------------------------------------------------------------------------------------
# shared, expensive things (module scope)


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder()


@pytest.fixture(scope="module")
def pipe(encoder) -> Pipeline:
    return Pipeline.random_tiny(text_encoder=encoder)


@pytest.fixture(scope="module")
def bundle(pipe, tmp_path_factory) -> Path:
    """A pristine pipeline bundle on disk (cases copy it before damaging it)."""
    return pipe.save_pretrained(tmp_path_factory.mktemp("bundle") / "tiny")


@pytest.fixture(scope="module")
def client(pipe):
    with TestClient(create_app(pipe, LIMITS), base_url=LOCAL) as c:
        yield c


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A complete one-step tokenizer checkpoint (cases copy it before damaging it)."""
    run = tmp_path_factory.mktemp("train") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(config_from_dict(TrainConfig, TRAIN_CONFIG), run).train()
    finally:
        torch.set_num_threads(threads)
    return run / "checkpoints" / "step-00000001"


# ------------------------------------------------------------------------------------------------------------
# helpers


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root (relative path -> bytes): compare before/after to prove nothing changed."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(root: Path) -> list[str]:
    """Temporary files/folders of interrupted or failed atomic writes anywhere under root."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if LEFTOVER.search(p.name))


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def noise_png(side: int = 64, seed: int = 0) -> bytes:
    """A PNG that compresses badly, so cutting it in half cuts the pixel data."""
    arr = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return png_bytes(Image.fromarray(arr))


def claimed_canvas_png(width: int, height: int) -> bytes:
    """A ~60-byte PNG whose IHDR claims width x height RGB pixels (no pixel data): a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


class Payload:
    """Unpickling this runs `touch MARKER`: a checkpoint that tries to execute code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def write_payload(path: Path, marker: Path, wrap: Callable[[object], object] = lambda x: x) -> None:
    torch.save(wrap(Payload(marker)), path)
    assert b"system" in path.read_bytes()  # the pickle really does reference os.system


def official_tokenizer(tmp: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """An official-format tokenizer config file and a matching state dict under the release's names."""
    cfg = config_from_dict(TokenizerConfig, {**TOKENIZER_MODEL, "image_size": 64})
    names = {ours: theirs for theirs, ours in _TOKENIZER_KEYS.items()}
    official = {names[k]: v for k, v in config_to_dict(cfg).items() if k in names}
    path = tmp / "official-config.json"
    path.write_text(json.dumps(official))
    converted = convert_config("tokenizer", official)
    state = {official_name("tokenizer", k, converted): v for k, v in BinaryTokenizer(converted).state_dict().items()}
    return path, state


def seed_output(out: Path) -> dict[str, bytes]:
    """An output folder from an earlier run: one image and its metadata line. Returns its snapshot."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "00000.png").write_bytes(png_bytes(Image.new("RGB", (64, 64), (10, 200, 30))))
    (out / "metadata.jsonl").write_text(json.dumps({"file": "00000.png", "prompt": "earlier", "seed": 1}) + "\n")
    return snapshot(out)


class Env:
    """What a case gets: a private tmp folder, in-process CLI and server runners, and the shared models."""

    def __init__(self, request, tmp_path: Path, capsys, monkeypatch):
        self.request, self.tmp, self.capsys, self.monkeypatch = request, tmp_path, capsys, monkeypatch
        self._patched = False

    def __getattr__(self, name: str):
        if name in ("encoder", "pipe", "bundle", "client", "checkpoint"):
            return self.request.getfixturevalue(name)
        raise AttributeError(name)

    # --- CLI ------------------------------------------------------------------------------------------------
    def cli(self, *argv) -> tuple[int, str, str]:
        if not self._patched:  # every pipeline the CLI loads reuses the one MiniLM instance
            shared = self.encoder

            class SharedEncoder(TextEncoder):
                def __new__(cls, *args, **kwargs):
                    return shared

            self.monkeypatch.setattr(pipeline_mod, "TextEncoder", SharedEncoder)
            self.monkeypatch.delenv("BINLAT_MODEL", raising=False)
            self._patched = True
        self.capsys.readouterr()
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:  # argparse's own exits
            code = e.code if isinstance(e.code, int) else 1
        out, err = self.capsys.readouterr()
        return code, out, err

    def cli_fails(self, argv, *needles: str, code: int | None = None) -> str:
        rc, _, err = self.cli(*argv)
        assert rc != 0, f"expected a failure, got exit 0; stderr: {err!r}"
        if code is not None:
            assert rc == code, (rc, err)
        assert "Traceback" not in err, err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1, f"expected exactly one stderr line, got {lines}"
        assert lines[0].startswith("binlat"), lines[0]
        for needle in needles:
            assert needle in lines[0], (needle, lines[0])
        return lines[0]

    def generate_args(self, *prompts: str, out: Path, model: Path | None = None, steps: int = 2) -> list:
        return ["generate", *prompts, "--model", model or self.bundle, "--out", out, "--steps", steps, "--no-progress"]

    # --- server ---------------------------------------------------------------------------------------------
    def server_fails(self, response, status: int, *needles: str) -> str:
        assert response.status_code == status, (response.status_code, response.text)
        assert 400 <= status < 500
        assert response.headers["content-type"].startswith("application/json")
        body = response.json()
        assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], body
        for needle in needles:
            assert needle in body["error"], (needle, body["error"])
        health = self.client.get("/healthz").json()
        assert health["status"] == "ok" and health["admitted"] == 0 and health["running"] == 0, health
        return body["error"]

    def post_raw(self, path: str, raw: bytes, ctype: str = "application/json"):
        return self.client.post(path, content=raw, headers={"content-type": ctype})

    # --- files ----------------------------------------------------------------------------------------------
    def copy_bundle(self, name: str = "bundle") -> Path:
        return Path(shutil.copytree(self.bundle, self.tmp / name))

    def train_config(self, **over) -> Path:
        path = self.tmp / "train.json"
        path.write_text(json.dumps({**TRAIN_CONFIG, **over}))
        return path


def new_catalogue():
    """(cases, entry_of, case): one catalogue's registry — case name -> its function, case name -> the entry point
    it feeds, and the `@case(name, entry)` decorator. Every catalogue file keeps its own."""
    cases: dict[str, Callable[[Env], None]] = {}
    entry_of: dict[str, str] = {}

    def case(name: str, entry: str):
        def register(fn: Callable[[Env], None]) -> Callable[[Env], None]:
            assert name not in cases, f"duplicate case {name}"
            cases[name], entry_of[name] = fn, entry
            return fn

        return register

    return cases, entry_of, case


CASES, ENTRY_OF, case = new_catalogue()


# ============================================================================================================
# CLI: prompts


@case("cli-empty-prompt", "binlat generate")
def _(env: Env) -> None:
    out = env.tmp / "out"
    before = seed_output(out)
    env.cli_fails(env.generate_args("", out=out), "prompt 0 is empty", code=2)
    assert snapshot(out) == before and not leftovers(out)


@case("cli-whitespace-prompt", "binlat generate")
def _(env: Env) -> None:
    out = env.tmp / "out"
    before = seed_output(out)
    env.cli_fails(env.generate_args("a cat", " \t ", out=out), "prompt 1 is empty", code=2)
    assert snapshot(out) == before and not leftovers(out)


@case("cli-prompts-file-blank-lines-only", "binlat generate")
def _(env: Env) -> None:
    prompts = env.tmp / "prompts.txt"
    prompts.write_text("\n   \n\t\n")
    out = env.tmp / "out"
    env.cli_fails(["generate", "--prompts", prompts, "--out", out], "no prompts", code=2)
    assert not out.exists()


@case("cli-prompts-file-invalid-utf8", "binlat generate")
def _(env: Env) -> None:
    prompts = env.tmp / "prompts.txt"
    prompts.write_bytes(b"a red circle\ncaf\xe9 \xff\xfe square\n")
    out = env.tmp / "out"
    env.cli_fails(["generate", "--prompts", prompts, "--out", out], "not valid UTF-8", "byte 16", code=2)
    assert not out.exists()


@case("cli-prompts-file-missing", "binlat generate")
def _(env: Env) -> None:
    env.cli_fails(
        ["generate", "--prompts", env.tmp / "nope.txt", "--out", env.tmp / "out"],
        "cannot read prompts file",
        "No such file",
        code=2,
    )


@case("cli-prompt-undecodable-argv-bytes", "binlat generate")
def _(env: Env) -> None:
    # On Linux, argv bytes that are not UTF-8 arrive as lone surrogates (surrogateescape).
    out = env.tmp / "out"
    before = seed_output(out)
    env.cli_fails(
        env.generate_args(b"caf\xe9".decode("utf-8", "surrogateescape"), out=out),
        "prompt 0 is not valid Unicode text",
        code=2,
    )
    assert snapshot(out) == before


@case("cli-prompt-100k-chars-truncated-with-warning", "binlat generate")
def _(env: Env) -> None:
    # Decision: the text encoder keeps its first max_length tokens and warns; the image is made, and
    # metadata.jsonl records the prompt as given.
    out = env.tmp / "out"
    with pytest.warns(UserWarning, match="exceed max_length=128 tokens and were truncated"):
        rc, stdout, err = env.cli(*env.generate_args(LONG_PROMPT, out=out, steps=1))
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "metadata.jsonl"]
    meta = [json.loads(line) for line in (out / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(meta) == 1 and meta[0]["prompt"] == LONG_PROMPT
    with Image.open(out / "00000.png") as im:
        assert im.size == (64, 64)


# ============================================================================================================
# CLI: sizes and sampling parameters


@case("cli-size-not-a-multiple", "binlat generate")
def _(env: Env) -> None:
    out = env.tmp / "out"
    before = seed_output(out)
    m = env.pipe.tokenizer.config.size_multiple
    env.cli_fails(
        env.generate_args("a cat", out=out) + ["--size", f"{4 * m + 1}"],
        "is not supported by this tokenizer",
        f"multiples of {m} px",
        f"nearest allowed: {4 * m}x{4 * m}",
        code=2,
    )
    assert snapshot(out) == before and not leftovers(out)


@case("cli-size-HxW-one-side-bad", "binlat generate")
def _(env: Env) -> None:
    out = env.tmp / "out"
    m = env.pipe.tokenizer.config.size_multiple
    env.cli_fails(
        env.generate_args("a cat", out=out) + ["--size", f"{4 * m}x{3 * m + 3}"],
        f"image size {4 * m}x{3 * m + 3} is not supported",
        code=2,
    )
    assert not list(out.glob("*.png"))


@case("cli-size-zero", "binlat generate")
def _(env: Env) -> None:
    out = env.tmp / "out"
    before = seed_output(out)
    env.cli_fails(env.generate_args("a cat", out=out) + ["--size", "0"], "image size 0x0 is not supported", code=2)
    assert snapshot(out) == before


@case("cli-size-garbage", "binlat generate")
def _(env: Env) -> None:
    env.cli_fails(env.generate_args("a cat", out=env.tmp / "out") + ["--size", "huge"], "size must be N or HxW", code=2)
    assert not (env.tmp / "out").exists()


# The option's text is read as the setting's type, then checked by the Settings dataclass that declares it: the
# words are the Python API's (API_BAD_SAMPLING), the value as that type.
CLI_BAD_SAMPLING = [
    ("steps", "0", "steps must be an integer >= 1, got 0"),
    ("steps", "-3", "steps must be an integer >= 1, got -3"),
    ("steps", "nan", "steps must be an integer, got 'nan'"),
    ("steps", "inf", "steps must be an integer, got 'inf'"),
    ("steps", "10001", "steps must be at most 10000, got 10001"),
    ("cfg", "-1", "guidance scale must be a finite number >= 0.0, got -1.0"),
    ("cfg", "nan", "guidance scale must be a finite number >= 0.0, got nan"),
    ("cfg", "inf", "guidance scale must be a finite number >= 0.0, got inf"),
    ("temperature", "-0.5", "temperature must be a finite number >= 0.0, got -0.5"),
    ("temperature", "nan", "temperature must be a finite number >= 0.0, got nan"),
    ("temperature", "-inf", "temperature must be a finite number >= 0.0, got -inf"),
    ("rho", "0", "rho must be a finite number > 0, got 0.0"),
    ("rho", "-1", "rho must be a finite number > 0, got -1.0"),
    ("rho", "nan", "rho must be a finite number > 0, got nan"),
    ("rho", "inf", "rho must be a finite number > 0, got inf"),
    ("protocol", "3", "protocol must be 1 or 2, got 3"),
    ("protocol", "two", "protocol must be an integer, got 'two'"),
]
for _option, _value, _message in CLI_BAD_SAMPLING:

    @case(f"cli-{_option}-{_value}", "binlat generate")
    def _(env: Env, option=_option, value=_value, message=_message) -> None:
        out = env.tmp / "out"
        env.cli_fails(env.generate_args("a cat", out=out) + [f"--{option}={value}"], f"--{option}", message, code=2)
        assert not out.exists()  # refused before anything was created


@case("cli-unknown-generator", "binlat generate")
def _(env: Env) -> None:
    env.cli_fails(
        env.generate_args("a cat", out=env.tmp / "out") + ["--generator", "gan"],
        "invalid choice: 'gan'",
        "diffusion",
        code=2,
    )


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


# ============================================================================================================
# CLI: output folders and file names


@case("cli-out-under-a-regular-file", "binlat generate")
def _(env: Env) -> None:
    blocker = env.tmp / "not-a-dir"
    blocker.write_bytes(b"keep me")
    env.cli_fails(
        env.generate_args("a cat", out=blocker / "out"), "cannot write to output directory", "Not a directory", code=2
    )
    assert blocker.read_bytes() == b"keep me"
    assert sorted(p.name for p in env.tmp.iterdir()) == ["not-a-dir"]


@case("cli-out-read-only-dir", "binlat generate")
def _(env: Env) -> None:
    if os.geteuid() == 0:
        pytest.skip("running as root: directory permissions do not block writes (see cli-out-under-a-regular-file)")
    out = env.tmp / "out"
    before = seed_output(out)
    out.chmod(0o555)
    try:
        env.cli_fails(
            env.generate_args("a cat", out=out), "cannot write to output directory", "Permission denied", code=2
        )
    finally:
        out.chmod(0o755)
    assert snapshot(out) == before


@case("cli-path-traversing-and-colliding-prompts", "binlat generate")
def _(env: Env) -> None:
    prompts = ["../../escape", "/etc/passwd", "a/b\\c:*?<>|.png", "../../escape", "00000.png", ".."]
    out = env.tmp / "work" / "out"
    out.mkdir(parents=True)
    outside = {p for p in env.tmp.rglob("*") if not p.is_relative_to(out)}

    def run() -> None:
        rc, _, err = env.cli(*env.generate_args(*prompts, out=out, steps=1), "--seed", 3)
        assert rc == 0, err

    run()
    first = snapshot(out)
    names = [f"{i:05d}.png" for i in range(len(prompts))]
    assert sorted(first) == sorted(names + ["metadata.jsonl"])
    run()  # a second run continues the numbering; nothing is overwritten
    second = snapshot(out)
    assert sorted(second) == sorted([f"{i:05d}.png" for i in range(2 * len(prompts))] + ["metadata.jsonl"])
    assert all(second[n] == first[n] for n in names)
    lines = second["metadata.jsonl"].decode().splitlines()
    assert second["metadata.jsonl"].startswith(first["metadata.jsonl"]) and len(lines) == 2 * len(prompts)
    assert [json.loads(line)["prompt"] for line in lines] == prompts * 2
    assert {p for p in env.tmp.rglob("*") if not p.is_relative_to(out)} == outside  # nothing outside --out
    assert not leftovers(out)


@case("cli-dtype-bfloat16-where-emulated", "binlat generate")
def _(env: Env) -> None:
    env.monkeypatch.setenv("BINLAT_ASSUME_BF16", "0")  # a CPU without avx512_bf16/AMX, whatever this one has
    out = env.tmp / "out"
    env.cli_fails(
        env.generate_args("a cat", out=out) + ["--dtype", "bfloat16"],
        "bfloat16 generation needs a CPU with native bf16",
        "--dtype float32",
        code=2,
    )
    assert not out.exists()  # refused before the model or the output folder was touched


# ============================================================================================================
# CLI: the other commands


def input_png(env: Env, name: str = "input.png") -> Path:
    path = env.tmp / name
    path.write_bytes(png_bytes(Image.new("RGB", (64, 64), (220, 30, 30))))
    return path


@case("cli-edit-input-not-an-image", "binlat edit")
def _(env: Env) -> None:
    notes, out = env.tmp / "notes.png", env.tmp / "out"
    notes.write_text("these are my notes, not a picture")
    before = seed_output(out)
    env.cli_fails(
        ["edit", notes, "--prompt", "a cat", "--model", env.bundle, "--out", out, "--no-progress"],
        "cannot read image",
        "notes.png",
        code=2,
    )
    assert snapshot(out) == before and not leftovers(out)


@case("cli-interpolate-missing-image", "binlat interpolate")
def _(env: Env) -> None:
    out = env.tmp / "out"
    before = seed_output(out)
    env.cli_fails(
        ["interpolate", input_png(env), env.tmp / "gone.png", "--model", env.bundle, "--out", out], "gone.png", code=1
    )
    assert snapshot(out) == before and not leftovers(out)


@case("cli-continue-keep-tokens-beyond-model", "binlat continue")
def _(env: Env) -> None:
    out = env.tmp / "out"
    before = seed_output(out)
    tokens = env.pipe.tokenizer.config.num_tokens
    env.cli_fails(
        [
            "continue",
            input_png(env),
            "--prompt",
            "a cat",
            "--keep-tokens",
            tokens + 1,
            "--model",
            env.bundle,
            "--out",
            out,
            "--no-progress",
        ],
        f"keep_tokens must be an integer in [0, {tokens}]",
        f"got {tokens + 1}",
        code=2,
    )
    assert snapshot(out) == before and not leftovers(out)


@case("cli-precompute-unknown-data-spec", "binlat precompute")
def _(env: Env) -> None:
    out = env.tmp / "bits"
    env.cli_fails(
        [
            "precompute",
            "--tokenizer",
            env.bundle / "tokenizer",
            "--data",
            env.tmp / "nowhere",
            "--out",
            out,
            "--no-progress",
        ],
        "unknown data spec",
        "no such file or directory",
        code=2,
    )
    assert not out.exists()


def command_shard(env: Env, scheme: str = "pipe") -> tuple[str, Path]:
    """A shard URL that would leave a marker file if its command ran (a .tar name, so it is read as shards)."""
    marker = env.tmp / "command-ran"
    if scheme == "pipe":
        return f"pipe:touch {marker}; cat {env.tmp / 'x.tar'}", marker
    return f"{scheme}://127.0.0.1:9/$(touch {marker})/x.tar", marker


@case("cli-train-config-data-url-never-runs", "binlat train")
def _(env: Env) -> None:
    url, marker = command_shard(env)
    for flags in ([], ["--allow-data-commands"]):  # the flag covers a typed --data only, never the config's
        env.cli_fails(
            ["train", "tokenizer", "--config", env.train_config(data=url), "--output", env.tmp / "run", *flags],
            "--allow-data-commands",
            code=2,
        )
        assert not marker.exists()


@case("cli-train-set-data-url-never-runs", "binlat train")
def _(env: Env) -> None:
    url, marker = command_shard(env)
    env.cli_fails(
        ["train", "tokenizer", "--config", env.train_config(), "--set", f"data={url}", "--output", env.tmp / "run"],
        "runs it as a shell command",
        "--allow-data-commands",
        code=2,
    )
    assert not marker.exists()


@case("cli-precompute-typed-url-needs-the-flag", "binlat precompute")
def _(env: Env) -> None:
    for scheme in ("pipe", "http", "gs"):
        url, marker = command_shard(env, scheme)
        out = env.tmp / "bits"
        env.cli_fails(
            [
                "precompute",
                "--tokenizer",
                env.bundle / "tokenizer",
                "--data",
                url,
                "--out",
                out,
                "--max-samples",
                1,
                "--no-progress",
            ],
            repr(url.split(";")[0])[:-1],
            "--allow-data-commands",
            code=2,
        )
        assert not marker.exists() and not out.exists()


@case("cli-eval-reconstruction-typed-url-needs-the-flag", "binlat eval reconstruction")
def _(env: Env) -> None:
    url, marker = command_shard(env)
    env.cli_fails(
        ["eval", "reconstruction", "--model", env.bundle, "--data", url, "--out", env.tmp / "eval", "--no-progress"],
        "--allow-data-commands",
        code=2,
    )
    assert not marker.exists()


@case("cli-probe-config-of-another-kind", "binlat probe")
def _(env: Env) -> None:
    out = env.tmp / "probes"
    env.cli_fails(
        ["probe", "diffusion", "--config", env.train_config(), "--steps", 1, "--out", out],
        "is a tokenizer config, not diffusion",
        code=2,
    )
    assert not out.exists()


@case("cli-config-show-unknown-preset", "binlat config show")
def _(env: Env) -> None:
    env.cli_fails(["config", "show", "diffusion/shapes-65"], "no preset of that name", "diffusion/shapes-64", code=2)
    env.cli_fails(["config", "show", "diffusion/shapes-64", "--set", "lr=Infinity"], "lr", code=2)


@case("cli-params-config-unknown-key", "binlat params")
def _(env: Env) -> None:
    env.cli_fails(["params", env.train_config(modle={})], "unknown key(s) ['modle']", "train.json", code=2)


@case("cli-export-run-without-checkpoint", "binlat export")
def _(env: Env) -> None:
    run, out = env.tmp / "run", env.tmp / "exported"
    run.mkdir()
    env.cli_fails(["export", run, "--out", out], "no checkpoint found", code=1)
    assert not out.exists() and sorted(run.iterdir()) == []


@case("cli-bundle-sampling-not-json", "binlat bundle")
def _(env: Env) -> None:
    out = env.tmp / "bundle"
    env.cli_fails(
        [
            "bundle",
            "--tokenizer",
            env.bundle / "tokenizer",
            "--diffusion",
            env.bundle / "diffusion",
            "--out",
            out,
            "--sampling",
            "{guidance_scale: 3}",
        ],
        "--sampling: not valid JSON",
        code=2,
    )
    assert not out.exists()


@case("cli-card-report-that-is-no-report", "binlat card")
def _(env: Env) -> None:
    report = env.tmp / "report-shapes.json"
    report.write_text('{"kind": "shapes", "summary": {"overall": "high"}}')
    before = snapshot(env.bundle)
    env.cli_fails(["card", env.bundle, "--eval", report], "--eval", "not a binlat eval report", code=2)
    assert snapshot(env.bundle) == before  # refused before the card or the index was touched


@case("cli-serve-port-in-use", "binlat serve")
def _(env: Env) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        # the port is bound before the model loads, so a busy port fails at once (no server is started)
        env.cli_fails(
            ["serve", "--model", env.tmp / "no-model", "--port", port], f"cannot listen on 127.0.0.1:{port}", code=1
        )


@case("cli-bench-json-folder-missing", "binlat bench")
def _(env: Env) -> None:
    target = env.tmp / "no-folder" / "bench.json"
    env.cli_fails(["bench", "--tiny", "--json", target], "--json", "does not exist", code=2)  # before any timing
    assert not target.parent.exists()


@case("cli-eval-reconstruction-model-missing", "binlat eval reconstruction")
def _(env: Env) -> None:
    out = env.tmp / "eval"
    env.cli_fails(
        ["eval", "reconstruction", "--model", env.tmp / "no-model", "--out", out, "--no-progress"],
        "no-model does not exist",
        code=1,
    )
    assert not out.exists()


@case("cli-eval-shapes-no-tokenizer-without-ground-truth", "binlat eval shapes")
def _(env: Env) -> None:
    out = env.tmp / "eval"
    env.cli_fails(
        ["eval", "shapes", "--no-tokenizer", "--model", env.bundle, "--out", out, "--no-progress"],
        "--no-tokenizer only applies with --ground-truth",
        code=2,
    )
    assert not out.exists()


@case("cli-eval-clip-score-images-missing", "binlat eval clip-score")
def _(env: Env) -> None:
    out = env.tmp / "eval"
    env.cli_fails(
        ["eval", "clip-score", "--images", env.tmp / "no-images", "--out", out], "no-images does not exist", code=1
    )
    assert not out.exists()


@case("cli-eval-fid-one-image-per-folder", "binlat eval fid")
def _(env: Env) -> None:
    real, fake, out = env.tmp / "real", env.tmp / "fake", env.tmp / "eval"
    for folder in (real, fake):
        folder.mkdir()
        input_png(env, f"{folder.name}/0.png")
    env.cli_fails(["eval", "fid", "--real", real, "--fake", fake, "--out", out], "FID needs at least 2 images", code=2)
    assert not out.exists()


@case("cli-conformance-unnamed-case-folder", "binlat conformance")
def _(env: Env) -> None:
    folder = env.tmp / "mycase"
    folder.mkdir()
    env.cli_fails(["conformance", folder], "cannot tell the network from the name", "tok_, diff_, ar_", code=2)


# ============================================================================================================
# Python API


@case("api-empty-prompt", "Pipeline.__call__")
def _(env: Env) -> None:
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        env.pipe("", num_steps=1, progress=False)


@case("api-whitespace-prompt-in-list", "Pipeline.__call__")
def _(env: Env) -> None:
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        env.pipe(["a cat", "\n\t  "], num_steps=1, progress=False)


@case("api-no-prompts", "Pipeline.__call__")
def _(env: Env) -> None:
    with pytest.raises(ValueError, match="no prompts given"):
        env.pipe([], num_steps=1, progress=False)


@case("api-prompt-not-text", "Pipeline.__call__")
def _(env: Env) -> None:
    with pytest.raises(ValueError, match="prompt 1 is not text"):
        env.pipe(["a cat", None], num_steps=1, progress=False)


@case("api-prompt-lone-surrogate", "Pipeline.__call__")
def _(env: Env) -> None:
    with pytest.raises(ValueError, match=r"prompt 0 is not valid Unicode text \(unpaired surrogate at character 3\)"):
        env.pipe(["caf\ud800"], num_steps=1, progress=False)


@case("api-prompt-100k-chars-truncated-with-warning", "Pipeline.__call__")
def _(env: Env) -> None:
    with pytest.warns(UserWarning, match="exceed max_length=128 tokens and were truncated"):
        result = env.pipe([LONG_PROMPT], num_steps=1, seed=0, progress=False)
    assert len(result.images) == 1 and result.images[0].size == (64, 64) and result.prompts == [LONG_PROMPT]


@case("api-size-not-a-multiple", "Pipeline.__call__")
def _(env: Env) -> None:
    with pytest.raises(ValueError, match=r"image size 65x64 is not supported.*nearest allowed: 64x64"):
        env.pipe(["a cat"], num_steps=1, height=65, width=64, progress=False)


@case("api-size-zero-is-not-default", "Pipeline.__call__")
def _(env: Env) -> None:
    with pytest.raises(ValueError, match="image size 0x0 is not supported"):
        env.pipe(["a cat"], num_steps=1, height=0, progress=False)


@case("api-size-negative", "Pipeline.__call__")
def _(env: Env) -> None:
    with pytest.raises(ValueError, match="image size 64x-64 is not supported"):
        env.pipe(["a cat"], num_steps=1, height=64, width=-64, progress=False)


API_BAD_SAMPLING = [
    ("num_steps", 0, "steps must be an integer >= 1, got 0"),
    ("num_steps", -3, "steps must be an integer >= 1, got -3"),
    ("num_steps", math.nan, "steps must be an integer >= 1, got nan"),
    ("num_steps", math.inf, "steps must be an integer >= 1, got inf"),
    ("guidance_scale", -1.0, "guidance scale must be a finite number >= 0.0, got -1.0"),
    ("guidance_scale", math.nan, "guidance scale must be a finite number >= 0.0, got nan"),
    ("guidance_scale", math.inf, "guidance scale must be a finite number >= 0.0, got inf"),
    ("temperature", -0.5, "temperature must be a finite number >= 0.0, got -0.5"),
    ("temperature", math.nan, "temperature must be a finite number >= 0.0, got nan"),
    ("temperature", -math.inf, "temperature must be a finite number >= 0.0, got -inf"),
    ("rho", 0.0, "rho must be a finite number > 0, got 0.0"),
    ("rho", -1.0, "rho must be a finite number > 0, got -1.0"),
    ("rho", math.nan, "rho must be a finite number > 0, got nan"),
    ("rho", math.inf, "rho must be a finite number > 0, got inf"),
]
for _name, _value, _message in API_BAD_SAMPLING:

    @case(f"api-{_name}-{_value}", "Pipeline.__call__")
    def _(env: Env, name=_name, value=_value, message=_message) -> None:
        with pytest.raises(ValueError, match=re.escape(message)):
            env.pipe(["a cat"], progress=False, **{"num_steps": 1, name: value})


@case("api-zero-guidance-and-temperature-are-valid", "Pipeline.__call__")
def _(env: Env) -> None:
    # Not errors: w = 0 is unguided sampling, temperature 0 thresholds the probabilities.
    for generator in ("diffusion", "ar"):
        result = env.pipe(
            ["a cat"],
            generator=generator,
            num_steps=1,
            guidance_scale=0.0,
            temperature=0.0,
            seed=1,
            progress=False,
            return_bits=True,
        )
        assert len(result.images) == 1 and result.bits.shape == (1, 16, 32)


@case("api-unknown-generator", "Pipeline.__call__")
def _(env: Env) -> None:
    with pytest.raises(ValueError, match=r"generator 'gan' is not in this model; available: \['ar', 'diffusion'\]"):
        env.pipe(["a cat"], generator="gan", progress=False)


@case("api-model-dir-missing-config", "BinaryTokenizer.from_pretrained")
def _(env: Env) -> None:
    model = env.copy_bundle()
    (model / "tokenizer" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="missing config.json; is this a BinaryTokenizer directory"):
        BinaryTokenizer.from_pretrained(model / "tokenizer")


@case("api-bundle-missing-generator-dir", "Pipeline.from_pretrained")
def _(env: Env) -> None:
    model = env.copy_bundle()
    shutil.rmtree(model / "ar")
    with pytest.raises(FileNotFoundError, match="ar: no such model directory"):
        Pipeline.from_pretrained(model, text_encoder=env.encoder)


@case("api-config-unknown-key", "DiffusionTransformer.from_pretrained")
def _(env: Env) -> None:
    model = env.copy_bundle()
    config = model / "diffusion" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "colour": "red"}))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['colour'\] for DiffusionConfig"):
        DiffusionTransformer.from_pretrained(model / "diffusion")


@case("api-config-mistyped-key", "DiffusionTransformer.from_pretrained")
def _(env: Env) -> None:
    model = env.copy_bundle()
    config = model / "diffusion" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "num_heads": 2.5}))
    with pytest.raises(ConfigError, match="'num_heads' must be an integer, got 2.5"):
        DiffusionTransformer.from_pretrained(model / "diffusion")


@case("api-config-not-json", "Pipeline.from_pretrained")
def _(env: Env) -> None:
    model = env.copy_bundle()
    (model / "model_index.json").write_text('{"generators": ["diffusion"],')
    with pytest.raises(ConfigError, match="model_index.json: not valid JSON"):
        Pipeline.from_pretrained(model, text_encoder=env.encoder)


@case("api-truncated-safetensors", "BinaryTokenizer.from_pretrained")
def _(env: Env) -> None:
    model = env.copy_bundle()
    weights = model / "tokenizer" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(WeightsError, match=r"not a valid safetensors file \(truncated or corrupt\?\)"):
        BinaryTokenizer.from_pretrained(model / "tokenizer")


@case("api-wrong-shape-weights", "BinaryTokenizer.from_pretrained")
def _(env: Env) -> None:
    model = env.copy_bundle()
    weights = model / "tokenizer" / "model.safetensors"
    state = load_file(weights)
    key = sorted(k for k, v in state.items() if v.ndim == 2)[0]
    state[key] = state[key][:, :-1].contiguous()
    save_file(state, weights)
    with pytest.raises(WeightsError, match=rf"wrong shapes \[{re.escape(key)}: file"):
        BinaryTokenizer.from_pretrained(model / "tokenizer")


@case("api-failed-save-over-existing-bundle", "Pipeline.save_pretrained")
def _(env: Env) -> None:
    target = env.copy_bundle()
    before = snapshot(target)
    real, calls = modeling_mod.save_safetensors, []

    def fails_on_second_part(tensors, path, metadata=None):  # the tokenizer is written, then the disk fills
        calls.append(path)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, path, metadata)

    env.monkeypatch.setattr(modeling_mod, "save_safetensors", fails_on_second_part)
    with pytest.raises(OSError, match="No space left on device"):
        env.pipe.save_pretrained(target)
    assert len(calls) == 2 and snapshot(target) == before and not leftovers(env.tmp)


@case("api-official-pt-pickle-payload-refused", "official.load_official_weights")
def _(env: Env) -> None:
    marker, weights = env.tmp / "MARKER", env.tmp / "bae.pt"
    write_payload(weights, marker)
    with pytest.raises(WeightsError, match="refused to load: the file holds more than plain tensors"):
        load_official_weights(weights)
    assert not marker.exists(), "the pickle payload ran"


@case("api-official-pt-truncated", "official.load_official_weights")
def _(env: Env) -> None:
    weights = env.tmp / "bae.pt"
    torch.save({"module": {"w": torch.randn(64, 64)}}, weights)
    weights.write_bytes(weights.read_bytes()[:300])
    with pytest.raises(WeightsError, match=r"cannot read as a PyTorch checkpoint \(truncated or corrupt\?\)"):
        load_official_weights(weights)


@case("api-official-pt-not-a-state-dict", "official.load_official_weights")
def _(env: Env) -> None:
    weights = env.tmp / "bae.pt"
    torch.save({"module": {"w": [1, 2, 3]}}, weights)
    with pytest.raises(WeightsError, match=r"expected a state dict \(or \{'module': state_dict\}\) of tensors"):
        load_official_weights(weights)


@case("api-ar-wrong-shape-weights", "ARTransformer.from_pretrained")
def _(env: Env) -> None:
    model = env.copy_bundle()
    weights = model / "ar" / "model.safetensors"
    state = load_file(weights)
    key = sorted(k for k, v in state.items() if v.ndim == 2)[-1]
    state[key] = state[key][:-1].contiguous()
    save_file(state, weights)
    with pytest.raises(WeightsError, match=rf"wrong shapes \[{re.escape(key)}: file"):
        ARTransformer.from_pretrained(model / "ar")


for _kind, _cls in (("tokenizer", BinaryTokenizer), ("diffusion", DiffusionTransformer), ("ar", ARTransformer)):

    @case(f"api-failed-save-over-existing-{_kind}-dir", f"{_cls.__name__}.save_pretrained")
    def _(env: Env, kind=_kind, cls=_cls) -> None:
        target = Path(shutil.copytree(env.bundle / kind, env.tmp / kind))
        before = snapshot(target)
        model = cls.from_pretrained(target)

        def disk_full(tensors, path, metadata=None):
            Path(path).write_bytes(b"half a file")
            raise OSError(errno.ENOSPC, "No space left on device")

        env.monkeypatch.setattr(modeling_mod, "save_safetensors", disk_full)
        with pytest.raises(OSError, match="No space left on device"):
            model.save_pretrained(target)
        assert snapshot(target) == before and not leftovers(env.tmp)


RED = Image.new("RGB", (64, 64), (220, 30, 30))


@case("api-edit-strength-above-1", "editing.edit")
def _(env: Env) -> None:
    with pytest.raises(ValueError, match=r"strength must be a number in \[0, 1\].*got 1.5"):
        editing.edit(env.pipe, RED, "a cat", strength=1.5, num_steps=1)


@case("api-interpolate-one-frame", "editing.interpolate")
def _(env: Env) -> None:
    with pytest.raises(ValueError, match="steps must be an integer >= 2, got 1"):
        editing.interpolate(env.pipe, RED, RED, steps=1)


@case("api-continue-keep-tokens-beyond-model", "editing.continue_ar")
def _(env: Env) -> None:
    with pytest.raises(ValueError, match=r"keep_tokens must be an integer in \[0, 16\].*got 17"):
        editing.continue_ar(env.pipe, RED, "a cat", keep_tokens=17)


@case("api-reconstruct-size-not-a-multiple", "editing.reconstruct")
def _(env: Env) -> None:
    with pytest.raises(ValueError, match=r"image size 65x64 is not supported.*nearest allowed: 64x64"):
        editing.reconstruct(env.pipe, RED, 65, 64)


@case("api-load-image-for-a-path-not-an-image", "editing.load_image_for")
def _(env: Env) -> None:
    with pytest.raises(ValueError, match="expected a PIL image, got str"):
        editing.load_image_for(env.pipe, "input.png")  # a path must be opened first (editing.open_image)


@case("api-image-bits-size-zero", "editing.image_bits")
def _(env: Env) -> None:
    with pytest.raises(ValueError, match=r"height must be an integer >= 1 \(pixels\), got 0"):
        editing.image_bits(env.pipe, RED, 0, 64)


@case("api-decode-bits-wrong-width", "editing.decode_bits")
def _(env: Env) -> None:
    with pytest.raises(ValueError, match=r"bits must be \[N, tokens, 32\], got \(1, 16, 31\)"):
        editing.decode_bits(env.pipe, torch.zeros(1, 16, 31))


@case("api-official-config-not-json", "official.read_official_config")
def _(env: Env) -> None:
    path = env.tmp / "config.json"
    path.write_text('{"patch_size": 8,')
    with pytest.raises(ConfigError, match=r"config\.json: not valid JSON"):
        read_official_config(path)


@case("api-build-official-unknown-kind", "official.build_official")
def _(env: Env) -> None:
    config, _ = official_tokenizer(env.tmp)
    with pytest.raises(ValueError, match=r"unknown kind 'vae'"):
        build_official("vae", config, env.tmp / "weights.safetensors")


@case("api-convert-official-truncated-weights-writes-nothing", "official.convert_official")
def _(env: Env) -> None:
    config, state = official_tokenizer(env.tmp)
    weights, out = env.tmp / "bae.safetensors", env.tmp / "converted"
    save_file(state, weights)
    weights.write_bytes(weights.read_bytes()[:-200])
    with pytest.raises(WeightsError, match=r"not a valid safetensors file \(truncated or corrupt\?\)"):
        convert_official("tokenizer", config, weights, out)
    assert not out.exists() and not leftovers(env.tmp)


# ============================================================================================================
# data readers


@case("data-zero-byte-image", "load_image")
def _(env: Env) -> None:
    path = env.tmp / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageLoadError, match=r"empty\.png is empty \(0 bytes\)"):
        load_image(path)


@case("data-truncated-png", "load_image")
def _(env: Env) -> None:
    path = env.tmp / "cut.png"
    path.write_bytes(noise_png()[:6000])
    with pytest.raises(ImageLoadError, match=r"cannot decode image .*cut\.png \(truncated or corrupt\)"):
        load_image(path)


@case("data-truncated-jpeg", "load_image")
def _(env: Env) -> None:
    arr = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = png_bytes(Image.fromarray(arr), "JPEG")
    with pytest.raises(ImageLoadError, match=r"cannot decode image cut\.jpg \(truncated or corrupt\)"):
        load_image(data[: len(data) // 2], name="cut.jpg")


@case("data-not-an-image", "load_image")
def _(env: Env) -> None:
    with pytest.raises(ImageLoadError, match=r"cannot identify image notes\.png .*not a known image format"):
        load_image(b"these are my notes, not a picture", name="notes.png")


@case("data-1x1-image", "load_image")
def _(env: Env) -> None:
    with pytest.raises(ImageLoadError, match=r"is too small: 1x1, need at least 8x8"):
        load_image(png_bytes(Image.new("RGB", (1, 1), (255, 0, 0))))


@case("data-20000x20000-header-decompression-bomb", "load_image")
def _(env: Env) -> None:
    data = claimed_canvas_png(20_000, 20_000)
    assert len(data) < 100
    with pytest.raises(ImageLoadError, match="too large .*decompression bomb guard|decompression bomb guard"):
        load_image(data, name="bomb.png")


@case("data-cmyk-loads-as-rgb", "load_image")
def _(env: Env) -> None:
    for fmt, tolerance in (("TIFF", 0), ("JPEG", 3)):
        data = png_bytes(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), fmt)  # pure red in CMYK
        rgb = np.asarray(to_rgb(load_image(data)), dtype=int)
        assert rgb.shape == (16, 16, 3)
        assert np.abs(rgb - [255, 0, 0]).max() <= tolerance, (fmt, rgb[0, 0])


@case("data-grayscale-loads-as-rgb", "load_image")
def _(env: Env) -> None:
    image = load_image(png_bytes(Image.new("L", (16, 16), 100)))
    assert image.mode == "L"
    assert (np.asarray(to_rgb(image)) == 100).all() and to_rgb(image).mode == "RGB"
    tensor = ImageTransform(16, random_crop=False)(image)
    assert tensor.shape == (3, 16, 16) and torch.allclose(tensor, torch.full_like(tensor, 100 / 127.5 - 1))


@case("data-alpha-composited-on-white", "load_image")
def _(env: Env) -> None:
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[:, :8] = (255, 0, 0, 255)  # opaque red
    rgba[:, 8:] = (0, 0, 255, 0)  # fully transparent (its colour must not show)
    rgb = np.asarray(to_rgb(load_image(png_bytes(Image.fromarray(rgba, "RGBA")))))
    assert (rgb[:, :8] == [255, 0, 0]).all() and (rgb[:, 8:] == [255, 255, 255]).all()
    la = np.asarray(to_rgb(load_image(png_bytes(Image.fromarray(rgba[..., [0, 3]], "LA")))))
    assert (la[:, :8] == 255).all() and (la[:, 8:] == 255).all()


@case("data-16-bit-scaled-to-8-bit", "load_image")
def _(env: Env) -> None:
    arr = np.full((16, 16), 257 * 200, dtype=np.uint16)
    arr[:, 8:] = 65535
    image = load_image(png_bytes(Image.fromarray(arr)))
    assert image.mode in ("I;16", "I")
    rgb = np.asarray(to_rgb(image))
    assert rgb.shape == (16, 16, 3) and (rgb[:, :8] == 200).all() and (rgb[:, 8:] == 255).all()


@case("data-image-folder-skips-and-counts-bad-files", "ImageFolderDataset")
def _(env: Env) -> None:
    root = env.tmp / "images"
    root.mkdir()
    (root / "good.png").write_bytes(png_bytes(Image.new("RGB", (40, 40), (0, 0, 255))))
    (root / "good.txt").write_text("a blue square")
    (root / "cmyk.jpg").write_bytes(png_bytes(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG"))
    (root / "cut.png").write_bytes(noise_png()[:5000])
    (root / "empty.png").write_bytes(b"")
    (root / "tiny.png").write_bytes(png_bytes(Image.new("RGB", (1, 1))))
    (root / "bomb.png").write_bytes(claimed_canvas_png(20_000, 20_000))
    (root / "badcaption.png").write_bytes(png_bytes(Image.new("RGB", (40, 40))))
    (root / "badcaption.txt").write_bytes(b"caf\xe9")
    before = snapshot(root)
    ds = ImageFolderDataset(root, ImageTransform(32, random_crop=False))
    samples = list(ds)
    assert [s["key"] for s in samples] == ["cmyk.jpg", "good.png"]
    assert ds.skipped == 5
    assert samples[1]["caption"] == "a blue square" and samples[1]["image"].shape == (3, 32, 32)
    assert samples[0]["image"][0].mean() > 0.95 and samples[0]["image"][1:].mean() < -0.95  # red
    assert snapshot(root) == before


@case("data-tar-shard-cut-mid-member", "WebDatasetShards")
def _(env: Env) -> None:
    def shard(path: Path, prefix: str, n: int) -> list[tuple[str, int]]:
        with tarfile.open(path, "w") as tf:
            for i in range(n):
                for ext, data in (("png", noise_png(32, seed=i)), ("txt", f"sample {prefix}{i}".encode())):
                    info = tarfile.TarInfo(f"{prefix}{i}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        with tarfile.open(path) as tf:
            return [(m.name, m.offset_data) for m in tf.getmembers()]

    full = env.tmp / "full.tar"
    members = dict(shard(full, "a", 3))
    cut = members["a1.png"] + 500  # in the middle of the second sample's image
    (env.tmp / "shard-000.tar").write_bytes(full.read_bytes()[:cut])
    full.unlink()
    shard(env.tmp / "shard-001.tar", "b", 2)
    ds = WebDatasetShards(str(env.tmp / "shard-{000..001}.tar"), ImageTransform(32, random_crop=False))
    keys = [s["key"] for s in ds]
    assert keys == ["a0", "b0", "b1"]  # the stream went on to the next shard
    assert ds.skipped == 1


@case("data-manifest-missing-files-skipped", "ManifestDataset")
def _(env: Env) -> None:
    (env.tmp / "here.png").write_bytes(png_bytes(Image.new("RGB", (40, 40), (9, 9, 9))))
    manifest = env.tmp / "data.jsonl"
    manifest.write_text(
        "\n".join(
            json.dumps(e)
            for e in [
                {"path": "gone.png", "caption": "missing"},
                {"path": "here.png", "caption": "present"},
                {"path": str(env.tmp / "also-gone.jpg"), "caption": "missing too"},
            ]
        )
        + "\n"
    )
    before = manifest.read_bytes()
    ds = ManifestDataset(manifest, ImageTransform(32, random_crop=False))
    samples = list(ds)
    assert [s["caption"] for s in samples] == ["present"] and ds.skipped == 2
    assert manifest.read_bytes() == before


@case("data-manifest-malformed-line", "ManifestDataset")
def _(env: Env) -> None:
    manifest = env.tmp / "data.jsonl"
    manifest.write_text('{"path": "a.png", "caption": "ok"}\n{"path": "b.png", "caption": \n')
    with pytest.raises(ValueError, match=r"data\.jsonl line 2: invalid JSON"):
        ManifestDataset(manifest, ImageTransform(32))


@case("data-unknown-spec", "make_dataset")
def _(env: Env) -> None:
    with pytest.raises(ValueError, match=r"unknown data spec .*no such file or directory"):
        make_dataset(str(env.tmp / "nowhere"), 32)


@case("data-shard-list-url-never-runs", "expand_shards")
def _(env: Env) -> None:
    """A shard list ('::' list, Python list, brace pattern) cannot smuggle a URL in beside local shards."""
    url, marker = command_shard(env)
    tar = env.tmp / "x.tar"
    with tarfile.open(tar, "w"):
        pass
    for urls in (f"{tar}::{url}", [str(tar), url], f"pipe:{{touch {marker},true}}; cat x.tar"):
        with pytest.raises(ValueError, match="--allow-data-commands"):
            expand_shards(urls)
        with pytest.raises(ValueError, match="--allow-data-commands"):
            make_dataset(urls if isinstance(urls, str) else "::".join(urls), 64)
    assert not marker.exists()
    assert expand_shards(str(tar)) == [str(tar.resolve())]  # local shards come back absolute: never a scheme


@case("data-shard-glob-matches-nothing", "expand_shards")
def _(env: Env) -> None:
    with pytest.raises(ValueError, match=r"shard glob .*shard-\*\.tar' matches no files"):
        expand_shards(str(env.tmp / "shard-*.tar"))


# ============================================================================================================
# server


@case("server-empty-prompt", "POST /v1/generate")
def _(env: Env) -> None:
    env.server_fails(env.client.post("/v1/generate", json={"prompt": ""}), 422, "prompt: empty")


@case("server-whitespace-prompt", "POST /v1/generate")
def _(env: Env) -> None:
    env.server_fails(env.client.post("/v1/generate", json={"prompts": ["a cat", " \n\t"]}), 422, "prompts[1]: empty")


@case("server-prompt-100k-chars-refused", "POST /v1/generate")
def _(env: Env) -> None:
    env.server_fails(
        env.client.post("/v1/generate", json={"prompt": LONG_PROMPT}),
        422,
        "100000 characters",
        "limit of 1000 (max_prompt_chars)",
    )


@case("server-body-over-limit", "POST /v1/generate")
def _(env: Env) -> None:
    raw = json.dumps({"prompt": "x" * (LIMITS.max_body_bytes + 10)}).encode()
    env.server_fails(env.post_raw("/v1/generate", raw), 413, "max_body_bytes")


@case("server-invalid-utf8-body", "POST /v1/generate")
def _(env: Env) -> None:
    env.server_fails(env.post_raw("/v1/generate", b'{"prompt": "caf\xe9 \xff"}'), 400, "not UTF-8")


@case("server-lone-surrogate-escape-in-prompt", "POST /v1/generate")
def _(env: Env) -> None:
    env.server_fails(env.post_raw("/v1/generate", b'{"prompt": "caf\\ud800"}'), 422, "prompt: not valid Unicode text")


@case("server-size-not-a-multiple", "POST /v1/generate")
def _(env: Env) -> None:
    env.server_fails(
        env.client.post("/v1/generate", json={"prompt": "x", "size": 65}),
        422,
        "size:",
        "not supported by this tokenizer",
    )


@case("server-size-zero", "POST /v1/generate")
def _(env: Env) -> None:
    env.server_fails(
        env.client.post("/v1/generate", json={"prompt": "x", "size": [0, 64]}), 422, "size: 0x64 is not a positive size"
    )


SERVER_BAD_SAMPLING = [
    ("steps", "0"),
    ("steps", "-3"),
    ("steps", "NaN"),
    ("steps", "Infinity"),
    ("guidance_scale", "-1"),
    ("guidance_scale", "NaN"),
    ("guidance_scale", "Infinity"),
    ("temperature", "-0.5"),
    ("temperature", "NaN"),
    ("temperature", "-Infinity"),
    ("rho", "0"),
    ("rho", "-1"),
    ("rho", "NaN"),
    ("rho", "Infinity"),
]
for _field, _literal in SERVER_BAD_SAMPLING:

    @case(f"server-{_field}-{_literal}", "POST /v1/generate")
    def _(env: Env, field=_field, literal=_literal) -> None:
        raw = f'{{"prompt": "a cat", "{field}": {literal}}}'.encode()  # NaN/Infinity: Python's JSON extension
        env.server_fails(env.post_raw("/v1/generate", raw), 422, f"{field}:")


@case("server-unknown-generator", "POST /v1/generate")
def _(env: Env) -> None:
    env.server_fails(env.client.post("/v1/generate", json={"prompt": "x", "generator": "gan"}), 422, "generator:")


@case("server-unknown-field", "POST /v1/generate")
def _(env: Env) -> None:
    env.server_fails(env.client.post("/v1/generate", json={"prompt": "x", "cfg": 3}), 422, "cfg: unknown field")


@case("server-upload-zero-byte", "POST /v1/reconstruct")
def _(env: Env) -> None:
    env.server_fails(
        env.client.post("/v1/reconstruct", files={"image": ("a.png", b"", "image/png")}),
        422,
        "image: the uploaded file is empty",
    )


@case("server-upload-truncated", "POST /v1/reconstruct")
def _(env: Env) -> None:
    env.server_fails(
        env.client.post("/v1/reconstruct", files={"image": ("a.png", noise_png()[:3000], "image/png")}),
        422,
        "image:",
        "truncated",
    )


@case("server-upload-20000x20000-header", "POST /v1/reconstruct")
def _(env: Env) -> None:
    bomb = claimed_canvas_png(20_000, 20_000)
    env.server_fails(
        env.client.post("/v1/reconstruct", files={"image": ("bomb.png", bomb, "image/png")}),
        422,
        "image:",
        "400000000 pixels",
        "decompression bomb",
    )


@case("server-edit-strength-above-1", "POST /v1/edit")
def _(env: Env) -> None:
    image = png_bytes(Image.new("RGB", (64, 64), (220, 30, 30)))
    env.server_fails(
        env.client.post(
            "/v1/edit", files={"image": ("a.png", image, "image/png")}, data={"prompt": "a cat", "strength": "1.5"}
        ),
        422,
        "strength:",
    )


for _path in ("/", "/healthz", "/v1/models"):  # the read-only routes: the one wrong thing to send is a body

    @case(f"server-post-to-get-route-{_path.strip('/').replace('/', '-') or 'page'}", f"GET {_path}")
    def _(env: Env, path=_path) -> None:
        env.server_fails(env.client.post(path, json={"prompt": "a cat"}), 405, "Method Not Allowed")


# ------------------------------------------------------------------------------------------------------------


@pytest.fixture
def env(request, tmp_path, capsys, monkeypatch) -> Env:
    return Env(request, tmp_path, capsys, monkeypatch)


@pytest.mark.parametrize("name", list(CASES))
def test_catalogue(name: str, env: Env) -> None:
    CASES[name](env)


# ------------------------------------------------------------------------------------------------------------
# What the catalogue must cover, derived from the package: a new command, route, reader or API function without
# a case fails test_catalogue_is_complete.


def cli_entry_points() -> set[str]:
    """Every command of the `binlat` parser as typed, nested ones included ("binlat eval fid")."""

    def walk(parser: argparse.ArgumentParser, words: str) -> set[str]:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            return {words}
        return {cmd for a in subs for name, sub in a.choices.items() for cmd in walk(sub, f"{words} {name}")}

    return walk(build_parser(), "binlat")


def _public_functions(module) -> dict[str, Callable]:
    return {
        n: f
        for n, f in vars(module).items()
        if inspect.isfunction(f) and not n.startswith("_") and f.__module__ == module.__name__
    }


def api_entry_points() -> set[str]:
    """Generation (Pipeline.__call__); loading and saving of the Pipeline and of every model class the package
    exports; every editing function that takes the pipeline; every official.py function reading a file the user
    names."""
    models = [getattr(binlat, n) for n in binlat.__all__ if hasattr(getattr(binlat, n), "from_pretrained")]
    names = {"Pipeline.__call__"}
    names |= {f"{cls.__name__}.{m}" for cls in (Pipeline, *models) for m in ("from_pretrained", "save_pretrained")}
    names |= {
        f"editing.{n}"
        for n, f in _public_functions(editing).items()
        if next(iter(inspect.signature(f).parameters), None) == "pipe"
    }
    names |= {
        f"official.{n}"
        for n, f in _public_functions(official_mod).items()
        if {"path", "config_path", "weights_path"} & set(inspect.signature(f).parameters)
    }
    return names


def server_entry_points(app) -> set[str]:
    return {f"{method} {route.path}" for route in app.routes if isinstance(route, APIRoute) for method in route.methods}


def data_entry_points() -> set[str]:
    """The datasets and spec functions readers.py exports, and the image loader every one of them reads with
    (collate only joins samples the readers made)."""
    exported = {n: getattr(readers_mod, n) for n in readers_mod.__all__}
    datasets = {n for n, obj in exported.items() if isinstance(obj, type) and issubclass(obj, IterableDataset)}
    functions = {n for n, obj in exported.items() if inspect.isfunction(obj) and n != "collate"}
    assert readers_mod.load_image is load_image
    return datasets | functions | {"load_image"}


def test_catalogue_is_complete(client) -> None:
    required = {
        "cli": cli_entry_points(),
        "api": api_entry_points(),
        "server": server_entry_points(client.app),
        "data": data_entry_points(),
    }
    # the derivations find what they are meant to (an empty or broken one would make the check below vacuous)
    assert {"binlat generate", "binlat train", "binlat eval fid", "binlat serve"} <= required["cli"]
    assert {
        "Pipeline.__call__",
        "Pipeline.from_pretrained",
        "BinaryTokenizer.from_pretrained",
        "editing.edit",
        "editing.interpolate",
        "editing.continue_ar",
        "official.convert_official",
    } <= required["api"]
    assert {"POST /v1/generate", "POST /v1/edit", "POST /v1/reconstruct", "GET /healthz"} <= required["server"]
    assert {"make_dataset", "ImageFolderDataset", "ManifestDataset", "WebDatasetShards"} <= required["data"]
    for name, entry in ENTRY_OF.items():
        surface = name.split("-")[0]
        assert entry in required.get(surface, set()), f"case {name}: {entry!r} is not a {surface} entry point"
    covered = set(ENTRY_OF.values())
    missing = {surface: sorted(entries - covered) for surface, entries in required.items() if entries - covered}
    assert not missing, f"entry points without a case: {missing}"
