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

Cases are registered with @case("surface-what") below; `pytest -k catalogue` runs them all.
"""
from __future__ import annotations

import errno
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
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import load_file, save_file

import binlat.modeling as modeling_mod
import binlat.pipeline as pipeline_mod
from binlat.cli import main
from binlat.config import ConfigError, config_from_dict, config_to_dict
from binlat.data.readers import ImageFolderDataset, ManifestDataset, WebDatasetShards, make_dataset
from binlat.data.transforms import ImageLoadError, ImageTransform, load_image, to_rgb
from binlat.generators import DiffusionTransformer
from binlat.io import WeightsError
from binlat.official import _TOKENIZER_KEYS, convert_config, load_official_weights, official_name
from binlat.pipeline import Pipeline
from binlat.serve import ServeLimits, create_app
from binlat.text import TextEncoder
from binlat.tokenizer import BinaryTokenizer, TokenizerConfig
from binlat.train.config import TrainConfig
from binlat.train.engine import Trainer

pytestmark = pytest.mark.filterwarnings("ignore:`log_with=.*no supported trackers:UserWarning")

LIMITS = ServeLimits(max_concurrent=1, max_queue=4, max_body_bytes=1_000_000, max_n=4, max_steps=8,
                     max_prompt_chars=1000, max_size=128)
LONG_PROMPT = ("a red circle above a blue square " * 3200)[:100_000]
TOKENIZER_MODEL = {"patch_size": 8, "num_tokens": 16, "num_bits": 16, "encoder_layers": 1, "encoder_heads": 2,
                   "encoder_head_dim": 16, "decoder_layers": 1, "decoder_heads": 2, "decoder_head_dim": 16,
                   "rope_axes_dims": [4, 6, 6], "downsample_after": [0], "upsample_after": [0]}
TRAIN_CONFIG = {"kind": "tokenizer", "model": TOKENIZER_MODEL, "image_size": 64, "batch_size": 8, "max_steps": 1,
                "warmup_steps": 1, "save_every": 1, "log_every": 1, "trackers": []}
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
    with TestClient(create_app(pipe, LIMITS)) as c:
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
        return ["generate", *prompts, "--model", model or self.bundle, "--out", out, "--steps", steps,
                "--no-progress"]

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


CASES: dict[str, Callable[[Env], None]] = {}


def case(name: str):
    def register(fn: Callable[[Env], None]) -> Callable[[Env], None]:
        assert name not in CASES, f"duplicate case {name}"
        CASES[name] = fn
        return fn
    return register


# ============================================================================================================
# CLI: prompts


@case("cli-empty-prompt")
def _(env: Env) -> None:
    out = env.tmp / "out"
    before = seed_output(out)
    env.cli_fails(env.generate_args("", out=out), "prompt 0 is empty", code=2)
    assert snapshot(out) == before and not leftovers(out)


@case("cli-whitespace-prompt")
def _(env: Env) -> None:
    out = env.tmp / "out"
    before = seed_output(out)
    env.cli_fails(env.generate_args("a cat", " \t ", out=out), "prompt 1 is empty", code=2)
    assert snapshot(out) == before and not leftovers(out)


@case("cli-prompts-file-blank-lines-only")
def _(env: Env) -> None:
    prompts = env.tmp / "prompts.txt"
    prompts.write_text("\n   \n\t\n")
    out = env.tmp / "out"
    env.cli_fails(["generate", "--prompts", prompts, "--out", out], "no prompts", code=2)
    assert not out.exists()


@case("cli-prompts-file-invalid-utf8")
def _(env: Env) -> None:
    prompts = env.tmp / "prompts.txt"
    prompts.write_bytes(b"a red circle\ncaf\xe9 \xff\xfe square\n")
    out = env.tmp / "out"
    env.cli_fails(["generate", "--prompts", prompts, "--out", out], "not valid UTF-8", "byte 16", code=2)
    assert not out.exists()


@case("cli-prompts-file-missing")
def _(env: Env) -> None:
    env.cli_fails(["generate", "--prompts", env.tmp / "nope.txt", "--out", env.tmp / "out"],
                  "cannot read prompts file", "No such file", code=2)


@case("cli-prompt-undecodable-argv-bytes")
def _(env: Env) -> None:
    # On Linux, argv bytes that are not UTF-8 arrive as lone surrogates (surrogateescape).
    out = env.tmp / "out"
    before = seed_output(out)
    env.cli_fails(env.generate_args(b"caf\xe9".decode("utf-8", "surrogateescape"), out=out),
                  "prompt 0 is not valid Unicode text", code=2)
    assert snapshot(out) == before


@case("cli-prompt-100k-chars-truncated-with-warning")
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


@case("cli-size-not-a-multiple")
def _(env: Env) -> None:
    out = env.tmp / "out"
    before = seed_output(out)
    m = env.pipe.tokenizer.config.size_multiple
    env.cli_fails(env.generate_args("a cat", out=out) + ["--size", f"{4 * m + 1}"],
                  "is not supported by this tokenizer", f"multiples of {m} px", f"nearest allowed: {4 * m}x{4 * m}",
                  code=2)
    assert snapshot(out) == before and not leftovers(out)


@case("cli-size-HxW-one-side-bad")
def _(env: Env) -> None:
    out = env.tmp / "out"
    m = env.pipe.tokenizer.config.size_multiple
    env.cli_fails(env.generate_args("a cat", out=out) + ["--size", f"{4 * m}x{3 * m + 3}"],
                  f"image size {4 * m}x{3 * m + 3} is not supported", code=2)
    assert not list(out.glob("*.png"))


@case("cli-size-zero")
def _(env: Env) -> None:
    out = env.tmp / "out"
    before = seed_output(out)
    env.cli_fails(env.generate_args("a cat", out=out) + ["--size", "0"], "image size 0x0 is not supported", code=2)
    assert snapshot(out) == before


@case("cli-size-garbage")
def _(env: Env) -> None:
    env.cli_fails(env.generate_args("a cat", out=env.tmp / "out") + ["--size", "huge"],
                  "size must be N or HxW", code=2)
    assert not (env.tmp / "out").exists()


CLI_BAD_SAMPLING = [
    ("steps", "0", "steps must be >= 1, got 0"),
    ("steps", "-3", "steps must be >= 1, got -3"),
    ("steps", "nan", "steps must be an integer, got 'nan'"),
    ("steps", "inf", "steps must be an integer, got 'inf'"),
    ("cfg", "-1", "guidance scale must be a finite number >= 0, got -1"),
    ("cfg", "nan", "guidance scale must be a finite number >= 0, got nan"),
    ("cfg", "inf", "guidance scale must be a finite number >= 0, got inf"),
    ("temperature", "-0.5", "temperature must be a finite number >= 0, got -0.5"),
    ("temperature", "nan", "temperature must be a finite number >= 0, got nan"),
    ("temperature", "-inf", "temperature must be a finite number >= 0, got -inf"),
    ("rho", "0", "rho must be a finite number > 0, got 0"),
    ("rho", "-1", "rho must be a finite number > 0, got -1"),
    ("rho", "nan", "rho must be a finite number > 0, got nan"),
    ("rho", "inf", "rho must be a finite number > 0, got inf"),
]
for _option, _value, _message in CLI_BAD_SAMPLING:
    @case(f"cli-{_option}-{_value}")
    def _(env: Env, option=_option, value=_value, message=_message) -> None:
        out = env.tmp / "out"
        env.cli_fails(env.generate_args("a cat", out=out) + [f"--{option}={value}"], f"--{option}", message,
                      code=2)
        assert not out.exists()  # refused before anything was created


@case("cli-unknown-generator")
def _(env: Env) -> None:
    env.cli_fails(env.generate_args("a cat", out=env.tmp / "out") + ["--generator", "gan"],
                  "invalid choice: 'gan'", "diffusion", code=2)


# ============================================================================================================
# CLI: model directories and checkpoints


@case("cli-model-dir-does-not-exist")
def _(env: Env) -> None:
    out = env.tmp / "out"
    env.cli_fails(env.generate_args("a cat", out=out, model=env.tmp / "no-model"), "does not exist", code=2)
    assert not list(out.glob("*.png"))


@case("cli-model-missing-weights-file")
def _(env: Env) -> None:
    model = env.copy_bundle()
    (model / "tokenizer" / "model.safetensors").unlink()
    before, out = snapshot(model), env.tmp / "out"
    env.cli_fails(env.generate_args("a cat", out=out, model=model), "tokenizer/model.safetensors",
                  "weights file not found", code=1)
    assert snapshot(model) == before and not list(out.glob("*.png"))


@case("cli-model-missing-index")
def _(env: Env) -> None:
    model = env.copy_bundle()
    (model / "model_index.json").unlink()
    env.cli_fails(env.generate_args("a cat", out=env.tmp / "out", model=model), "missing model_index.json", code=1)


@case("cli-model-config-unknown-key")
def _(env: Env) -> None:
    model = env.copy_bundle()
    config = model / "diffusion" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "num_layerz": 3}))
    env.cli_fails(env.generate_args("a cat", out=env.tmp / "out", model=model),
                  "unknown key(s) ['num_layerz']", "diffusion/config.json", code=2)


@case("cli-model-config-mistyped-key")
def _(env: Env) -> None:
    model = env.copy_bundle()
    config = model / "tokenizer" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "num_bits": "32"}))
    env.cli_fails(env.generate_args("a cat", out=env.tmp / "out", model=model),
                  "'num_bits' must be an integer, got '32'", code=2)


@case("cli-model-truncated-safetensors")
def _(env: Env) -> None:
    model = env.copy_bundle()
    weights = model / "diffusion" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    env.cli_fails(env.generate_args("a cat", out=env.tmp / "out", model=model),
                  "not a valid safetensors file (truncated or corrupt?)", code=1)


@case("cli-model-wrong-shape-weights")
def _(env: Env) -> None:
    model = env.copy_bundle()
    weights = model / "ar" / "model.safetensors"
    state = load_file(weights)
    key = sorted(k for k, v in state.items() if v.ndim == 2)[0]
    state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])
    save_file(state, weights)
    env.cli_fails(env.generate_args("a cat", out=env.tmp / "out", model=model) + ["--generator", "ar"],
                  "wrong shapes", key, code=1)


@case("cli-convert-official-pickle-payload-refused")
def _(env: Env) -> None:
    config, _ = official_tokenizer(env.tmp)
    marker, weights, out = env.tmp / "MARKER", env.tmp / "bae.pt", env.tmp / "converted"
    write_payload(weights, marker, lambda p: {"module": {"encoder.patch_embedder.weight": p}})
    env.cli_fails(["convert-official", "--kind", "tokenizer", "--config", config, "--weights", weights, "--out", out],
                  "refused to load", "bae.pt", code=1)
    assert not marker.exists(), "the pickle payload ran"
    assert not out.exists() and not leftovers(env.tmp)


@case("cli-convert-official-wrong-shape-over-existing-dir")
def _(env: Env) -> None:
    config, state = official_tokenizer(env.tmp)
    key = sorted(k for k, v in state.items() if v.ndim == 2)[0]
    state[key] = torch.zeros(3, 3)
    weights = env.tmp / "bae.safetensors"
    save_file(state, weights)
    out = Path(shutil.copytree(env.bundle / "tokenizer", env.tmp / "existing"))
    before = snapshot(out)
    env.cli_fails(["convert-official", "--kind", "tokenizer", "--config", config, "--weights", weights, "--out", out],
                  "wrong shapes", key, code=1)
    assert snapshot(out) == before and not leftovers(env.tmp)


@case("cli-train-config-unknown-key")
def _(env: Env) -> None:
    run = env.tmp / "run"
    env.cli_fails(["train", "tokenizer", "--config", env.train_config(learning_rate=1e-3), "--output", run],
                  "unknown key(s) ['learning_rate']", code=2)
    assert not run.exists()


@case("cli-train-config-mistyped-key")
def _(env: Env) -> None:
    run = env.tmp / "run"
    env.cli_fails(["train", "tokenizer", "--config", env.train_config(max_steps="12"), "--output", run],
                  "'max_steps' must be an integer, got '12'", code=2)
    assert not run.exists()


@case("cli-train-resume-latest-without-checkpoint")
def _(env: Env) -> None:
    run = env.tmp / "run"
    env.cli_fails(["train", "tokenizer", "--config", env.train_config(), "--output", run, "--resume", "latest"],
                  "--resume latest: no checkpoint", code=1)
    assert not (run / "config.json").exists() and not (run / "checkpoints").exists()


def _resume_fails(env: Env, damage: Callable[[Path], None], *needles: str) -> Path:
    ckpt = Path(shutil.copytree(env.checkpoint, env.tmp / "ckpt"))
    damage(ckpt)
    before, run = snapshot(ckpt), env.tmp / "run"
    handlers = list(logging.getLogger("binlat").handlers)
    env.cli_fails(["train", "tokenizer", "--config", env.train_config(), "--output", run, "--resume", ckpt],
                  *needles, code=1)
    assert snapshot(ckpt) == before  # the checkpoint is only read
    assert not (run / "config.json").exists() and not (run / "checkpoints").exists()
    assert logging.getLogger("binlat").handlers == handlers  # the failed run detached its log file
    return ckpt


@case("cli-train-resume-checkpoint-pickle-payload-refused")
def _(env: Env) -> None:
    marker = env.tmp / "MARKER"
    _resume_fails(env, lambda ckpt: write_payload(ckpt / "optimizer.pt", marker,
                                                  lambda p: {"state": {0: p}, "param_groups": []}),
                  "optimizer.pt", "refused to load")
    assert not marker.exists(), "the pickle payload ran"


@case("cli-train-resume-truncated-checkpoint")
def _(env: Env) -> None:
    def cut(ckpt: Path) -> None:
        weights = ckpt / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    _resume_fails(env, cut, "model.safetensors", "not a valid safetensors file")


@case("cli-train-resume-checkpoint-of-another-shape")
def _(env: Env) -> None:
    def reshape(ckpt: Path) -> None:
        state = load_file(ckpt / "ema.safetensors")
        key = sorted(k for k, v in state.items() if v.ndim == 2)[0]
        state[key] = torch.zeros(2, 2)
        save_file(state, ckpt / "ema.safetensors")
    _resume_fails(env, reshape, "ema.safetensors", "wrong shapes")


# ============================================================================================================
# CLI: output folders and file names


@case("cli-out-under-a-regular-file")
def _(env: Env) -> None:
    blocker = env.tmp / "not-a-dir"
    blocker.write_bytes(b"keep me")
    env.cli_fails(env.generate_args("a cat", out=blocker / "out"), "cannot write to output directory",
                  "Not a directory", code=2)
    assert blocker.read_bytes() == b"keep me"
    assert sorted(p.name for p in env.tmp.iterdir()) == ["not-a-dir"]


@case("cli-out-read-only-dir")
def _(env: Env) -> None:
    if os.geteuid() == 0:
        pytest.skip("running as root: directory permissions do not block writes (see cli-out-under-a-regular-file)")
    out = env.tmp / "out"
    before = seed_output(out)
    out.chmod(0o555)
    try:
        env.cli_fails(env.generate_args("a cat", out=out), "cannot write to output directory", "Permission denied",
                      code=2)
    finally:
        out.chmod(0o755)
    assert snapshot(out) == before


@case("cli-path-traversing-and-colliding-prompts")
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


# ============================================================================================================
# Python API


@case("api-empty-prompt")
def _(env: Env) -> None:
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        env.pipe("", num_steps=1, progress=False)


@case("api-whitespace-prompt-in-list")
def _(env: Env) -> None:
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        env.pipe(["a cat", "\n\t  "], num_steps=1, progress=False)


@case("api-no-prompts")
def _(env: Env) -> None:
    with pytest.raises(ValueError, match="no prompts given"):
        env.pipe([], num_steps=1, progress=False)


@case("api-prompt-not-text")
def _(env: Env) -> None:
    with pytest.raises(ValueError, match="prompt 1 is not text"):
        env.pipe(["a cat", None], num_steps=1, progress=False)


@case("api-prompt-lone-surrogate")
def _(env: Env) -> None:
    with pytest.raises(ValueError, match=r"prompt 0 is not valid Unicode text \(unpaired surrogate at character 3\)"):
        env.pipe(["caf\ud800"], num_steps=1, progress=False)


@case("api-prompt-100k-chars-truncated-with-warning")
def _(env: Env) -> None:
    with pytest.warns(UserWarning, match="exceed max_length=128 tokens and were truncated"):
        result = env.pipe([LONG_PROMPT], num_steps=1, seed=0, progress=False)
    assert len(result.images) == 1 and result.images[0].size == (64, 64) and result.prompts == [LONG_PROMPT]


@case("api-size-not-a-multiple")
def _(env: Env) -> None:
    with pytest.raises(ValueError, match=r"image size 65x64 is not supported.*nearest allowed: 64x64"):
        env.pipe(["a cat"], num_steps=1, height=65, width=64, progress=False)


@case("api-size-zero-is-not-default")
def _(env: Env) -> None:
    with pytest.raises(ValueError, match="image size 0x0 is not supported"):
        env.pipe(["a cat"], num_steps=1, height=0, progress=False)


@case("api-size-negative")
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
    @case(f"api-{_name}-{_value}")
    def _(env: Env, name=_name, value=_value, message=_message) -> None:
        with pytest.raises(ValueError, match=re.escape(message)):
            env.pipe(["a cat"], progress=False, **{"num_steps": 1, name: value})


@case("api-zero-guidance-and-temperature-are-valid")
def _(env: Env) -> None:
    # Not errors: w = 0 is unguided sampling, temperature 0 thresholds the probabilities.
    for generator in ("diffusion", "ar"):
        result = env.pipe(["a cat"], generator=generator, num_steps=1, guidance_scale=0.0, temperature=0.0, seed=1,
                          progress=False, return_bits=True)
        assert len(result.images) == 1 and result.bits.shape == (1, 16, 32)


@case("api-unknown-generator")
def _(env: Env) -> None:
    with pytest.raises(ValueError, match=r"generator 'gan' is not in this model; available: \['ar', 'diffusion'\]"):
        env.pipe(["a cat"], generator="gan", progress=False)


@case("api-model-dir-missing-config")
def _(env: Env) -> None:
    model = env.copy_bundle()
    (model / "tokenizer" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="missing config.json; is this a BinaryTokenizer directory"):
        BinaryTokenizer.from_pretrained(model / "tokenizer")


@case("api-bundle-missing-generator-dir")
def _(env: Env) -> None:
    model = env.copy_bundle()
    shutil.rmtree(model / "ar")
    with pytest.raises(FileNotFoundError, match="ar: no such model directory"):
        Pipeline.from_pretrained(model, text_encoder=env.encoder)


@case("api-config-unknown-key")
def _(env: Env) -> None:
    model = env.copy_bundle()
    config = model / "diffusion" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "colour": "red"}))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['colour'\] for GeneratorConfig"):
        DiffusionTransformer.from_pretrained(model / "diffusion")


@case("api-config-mistyped-key")
def _(env: Env) -> None:
    model = env.copy_bundle()
    config = model / "diffusion" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "num_heads": 2.5}))
    with pytest.raises(ConfigError, match="'num_heads' must be an integer, got 2.5"):
        DiffusionTransformer.from_pretrained(model / "diffusion")


@case("api-config-not-json")
def _(env: Env) -> None:
    model = env.copy_bundle()
    (model / "model_index.json").write_text('{"generators": ["diffusion"],')
    with pytest.raises(ConfigError, match="model_index.json: not valid JSON"):
        Pipeline.from_pretrained(model, text_encoder=env.encoder)


@case("api-truncated-safetensors")
def _(env: Env) -> None:
    model = env.copy_bundle()
    weights = model / "tokenizer" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(WeightsError, match=r"not a valid safetensors file \(truncated or corrupt\?\)"):
        BinaryTokenizer.from_pretrained(model / "tokenizer")


@case("api-wrong-shape-weights")
def _(env: Env) -> None:
    model = env.copy_bundle()
    weights = model / "tokenizer" / "model.safetensors"
    state = load_file(weights)
    key = sorted(k for k, v in state.items() if v.ndim == 2)[0]
    state[key] = state[key][:, :-1].contiguous()
    save_file(state, weights)
    with pytest.raises(WeightsError, match=rf"wrong shapes \[{re.escape(key)}: file"):
        BinaryTokenizer.from_pretrained(model / "tokenizer")


@case("api-failed-save-over-existing-model-dir")
def _(env: Env) -> None:
    target = Path(shutil.copytree(env.bundle / "tokenizer", env.tmp / "tokenizer"))
    before = snapshot(target)
    model = BinaryTokenizer.from_pretrained(target)

    def disk_full(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    env.monkeypatch.setattr(modeling_mod, "save_safetensors", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        model.save_pretrained(target)
    assert snapshot(target) == before and not leftovers(env.tmp)


@case("api-failed-save-over-existing-bundle")
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


@case("api-official-pt-pickle-payload-refused")
def _(env: Env) -> None:
    marker, weights = env.tmp / "MARKER", env.tmp / "bae.pt"
    write_payload(weights, marker)
    with pytest.raises(WeightsError, match="refused to load: the file holds more than plain tensors"):
        load_official_weights(weights)
    assert not marker.exists(), "the pickle payload ran"


@case("api-official-pt-truncated")
def _(env: Env) -> None:
    weights = env.tmp / "bae.pt"
    torch.save({"module": {"w": torch.randn(64, 64)}}, weights)
    weights.write_bytes(weights.read_bytes()[:300])
    with pytest.raises(WeightsError, match=r"cannot read as a PyTorch checkpoint \(truncated or corrupt\?\)"):
        load_official_weights(weights)


@case("api-official-pt-not-a-state-dict")
def _(env: Env) -> None:
    weights = env.tmp / "bae.pt"
    torch.save({"module": {"w": [1, 2, 3]}}, weights)
    with pytest.raises(WeightsError, match=r"expected a state dict \(or \{'module': state_dict\}\) of tensors"):
        load_official_weights(weights)


# ============================================================================================================
# data readers


@case("data-zero-byte-image")
def _(env: Env) -> None:
    path = env.tmp / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageLoadError, match=r"empty\.png is empty \(0 bytes\)"):
        load_image(path)


@case("data-truncated-png")
def _(env: Env) -> None:
    path = env.tmp / "cut.png"
    path.write_bytes(noise_png()[:6000])
    with pytest.raises(ImageLoadError, match=r"cannot decode image .*cut\.png \(truncated or corrupt\)"):
        load_image(path)


@case("data-truncated-jpeg")
def _(env: Env) -> None:
    arr = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = png_bytes(Image.fromarray(arr), "JPEG")
    with pytest.raises(ImageLoadError, match=r"cannot decode image cut\.jpg \(truncated or corrupt\)"):
        load_image(data[: len(data) // 2], name="cut.jpg")


@case("data-not-an-image")
def _(env: Env) -> None:
    with pytest.raises(ImageLoadError, match=r"cannot identify image notes\.png .*not a known image format"):
        load_image(b"these are my notes, not a picture", name="notes.png")


@case("data-1x1-image")
def _(env: Env) -> None:
    with pytest.raises(ImageLoadError, match=r"is too small: 1x1, need at least 8x8"):
        load_image(png_bytes(Image.new("RGB", (1, 1), (255, 0, 0))))


@case("data-20000x20000-header-decompression-bomb")
def _(env: Env) -> None:
    data = claimed_canvas_png(20_000, 20_000)
    assert len(data) < 100
    with pytest.raises(ImageLoadError, match="too large .*decompression bomb guard|decompression bomb guard"):
        load_image(data, name="bomb.png")


@case("data-cmyk-loads-as-rgb")
def _(env: Env) -> None:
    for fmt, tolerance in (("TIFF", 0), ("JPEG", 3)):
        data = png_bytes(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), fmt)  # pure red in CMYK
        rgb = np.asarray(to_rgb(load_image(data)), dtype=int)
        assert rgb.shape == (16, 16, 3)
        assert np.abs(rgb - [255, 0, 0]).max() <= tolerance, (fmt, rgb[0, 0])


@case("data-grayscale-loads-as-rgb")
def _(env: Env) -> None:
    image = load_image(png_bytes(Image.new("L", (16, 16), 100)))
    assert image.mode == "L"
    assert (np.asarray(to_rgb(image)) == 100).all() and to_rgb(image).mode == "RGB"
    tensor = ImageTransform(16, random_crop=False)(image)
    assert tensor.shape == (3, 16, 16) and torch.allclose(tensor, torch.full_like(tensor, 100 / 127.5 - 1))


@case("data-alpha-composited-on-white")
def _(env: Env) -> None:
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[:, :8] = (255, 0, 0, 255)  # opaque red
    rgba[:, 8:] = (0, 0, 255, 0)    # fully transparent (its colour must not show)
    rgb = np.asarray(to_rgb(load_image(png_bytes(Image.fromarray(rgba, "RGBA")))))
    assert (rgb[:, :8] == [255, 0, 0]).all() and (rgb[:, 8:] == [255, 255, 255]).all()
    la = np.asarray(to_rgb(load_image(png_bytes(Image.fromarray(rgba[..., [0, 3]], "LA")))))
    assert (la[:, :8] == 255).all() and (la[:, 8:] == 255).all()


@case("data-16-bit-scaled-to-8-bit")
def _(env: Env) -> None:
    arr = np.full((16, 16), 257 * 200, dtype=np.uint16)
    arr[:, 8:] = 65535
    image = load_image(png_bytes(Image.fromarray(arr)))
    assert image.mode in ("I;16", "I")
    rgb = np.asarray(to_rgb(image))
    assert rgb.shape == (16, 16, 3) and (rgb[:, :8] == 200).all() and (rgb[:, 8:] == 255).all()


@case("data-image-folder-skips-and-counts-bad-files")
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


@case("data-tar-shard-cut-mid-member")
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


@case("data-manifest-missing-files-skipped")
def _(env: Env) -> None:
    (env.tmp / "here.png").write_bytes(png_bytes(Image.new("RGB", (40, 40), (9, 9, 9))))
    manifest = env.tmp / "data.jsonl"
    manifest.write_text("\n".join(json.dumps(e) for e in [
        {"path": "gone.png", "caption": "missing"}, {"path": "here.png", "caption": "present"},
        {"path": str(env.tmp / "also-gone.jpg"), "caption": "missing too"}]) + "\n")
    before = manifest.read_bytes()
    ds = ManifestDataset(manifest, ImageTransform(32, random_crop=False))
    samples = list(ds)
    assert [s["caption"] for s in samples] == ["present"] and ds.skipped == 2
    assert manifest.read_bytes() == before


@case("data-manifest-malformed-line")
def _(env: Env) -> None:
    manifest = env.tmp / "data.jsonl"
    manifest.write_text('{"path": "a.png", "caption": "ok"}\n{"path": "b.png", "caption": \n')
    with pytest.raises(ValueError, match=r"data\.jsonl line 2: invalid JSON"):
        ManifestDataset(manifest, ImageTransform(32))


@case("data-unknown-spec")
def _(env: Env) -> None:
    with pytest.raises(ValueError, match=r"unknown data spec .*no such file or directory"):
        make_dataset(str(env.tmp / "nowhere"), 32)


# ============================================================================================================
# server


@case("server-empty-prompt")
def _(env: Env) -> None:
    env.server_fails(env.client.post("/v1/generate", json={"prompt": ""}), 422, "prompt: empty")


@case("server-whitespace-prompt")
def _(env: Env) -> None:
    env.server_fails(env.client.post("/v1/generate", json={"prompts": ["a cat", " \n\t"]}), 422, "prompts[1]: empty")


@case("server-prompt-100k-chars-refused")
def _(env: Env) -> None:
    env.server_fails(env.client.post("/v1/generate", json={"prompt": LONG_PROMPT}), 422,
                     "100000 characters", "limit of 1000 (max_prompt_chars)")


@case("server-body-over-limit")
def _(env: Env) -> None:
    raw = json.dumps({"prompt": "x" * (LIMITS.max_body_bytes + 10)}).encode()
    env.server_fails(env.post_raw("/v1/generate", raw), 413, "max_body_bytes")


@case("server-invalid-utf8-body")
def _(env: Env) -> None:
    env.server_fails(env.post_raw("/v1/generate", b'{"prompt": "caf\xe9 \xff"}'), 400, "not UTF-8")


@case("server-lone-surrogate-escape-in-prompt")
def _(env: Env) -> None:
    env.server_fails(env.post_raw("/v1/generate", b'{"prompt": "caf\\ud800"}'), 422,
                     "prompt: not valid Unicode text")


@case("server-size-not-a-multiple")
def _(env: Env) -> None:
    env.server_fails(env.client.post("/v1/generate", json={"prompt": "x", "size": 65}), 422,
                     "size:", "not supported by this tokenizer")


@case("server-size-zero")
def _(env: Env) -> None:
    env.server_fails(env.client.post("/v1/generate", json={"prompt": "x", "size": [0, 64]}), 422,
                     "size: 0x64 is not a positive size")


SERVER_BAD_SAMPLING = [
    ("steps", "0"), ("steps", "-3"), ("steps", "NaN"), ("steps", "Infinity"),
    ("guidance_scale", "-1"), ("guidance_scale", "NaN"), ("guidance_scale", "Infinity"),
    ("temperature", "-0.5"), ("temperature", "NaN"), ("temperature", "-Infinity"),
    ("rho", "0"), ("rho", "-1"), ("rho", "NaN"), ("rho", "Infinity"),
]
for _field, _literal in SERVER_BAD_SAMPLING:
    @case(f"server-{_field}-{_literal}")
    def _(env: Env, field=_field, literal=_literal) -> None:
        raw = f'{{"prompt": "a cat", "{field}": {literal}}}'.encode()  # NaN/Infinity: Python's JSON extension
        env.server_fails(env.post_raw("/v1/generate", raw), 422, f"{field}:")


@case("server-unknown-generator")
def _(env: Env) -> None:
    env.server_fails(env.client.post("/v1/generate", json={"prompt": "x", "generator": "gan"}), 422, "generator:")


@case("server-unknown-field")
def _(env: Env) -> None:
    env.server_fails(env.client.post("/v1/generate", json={"prompt": "x", "cfg": 3}), 422,
                     "cfg: unknown field")


@case("server-upload-zero-byte")
def _(env: Env) -> None:
    env.server_fails(env.client.post("/v1/reconstruct", files={"image": ("a.png", b"", "image/png")}), 422,
                     "image: the uploaded file is empty")


@case("server-upload-truncated")
def _(env: Env) -> None:
    env.server_fails(env.client.post("/v1/reconstruct", files={"image": ("a.png", noise_png()[:3000], "image/png")}),
                     422, "image:", "truncated")


@case("server-upload-20000x20000-header")
def _(env: Env) -> None:
    bomb = claimed_canvas_png(20_000, 20_000)
    env.server_fails(env.client.post("/v1/reconstruct", files={"image": ("bomb.png", bomb, "image/png")}), 422,
                     "image:", "400000000 pixels", "decompression bomb")


# ------------------------------------------------------------------------------------------------------------


@pytest.fixture
def env(request, tmp_path, capsys, monkeypatch) -> Env:
    return Env(request, tmp_path, capsys, monkeypatch)


@pytest.mark.parametrize("name", list(CASES))
def test_catalogue(name: str, env: Env) -> None:
    CASES[name](env)


def test_catalogue_is_complete() -> None:
    surfaces = {name.split("-")[0] for name in CASES}
    assert surfaces == {"cli", "api", "data", "server"}
    assert len(CASES) >= 30
