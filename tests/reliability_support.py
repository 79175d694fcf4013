"""What the files of the reliability catalogue share: every way a user can hand binlat something wrong.

The catalogue is split by surface: tests/test_reliability_cli_generate.py, _cli_models.py, _cli_commands.py,
_api.py, _data.py and _server.py each register their cases with their own `new_catalogue()` and run them in one
parametrised test_catalogue; tests/test_reliability_coverage.py checks that every entry point of the package has a
case in one of them. The hostile-input files (tests/test_hostile_files_*.py, tests/test_hostile_memory.py) reuse
the same Env, fixtures and helpers.

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

Cases are registered with @case("surface-what", ENTRY), ENTRY naming the entry point the bad input goes to
("binlat generate", "Pipeline.__call__", "POST /v1/generate", "ManifestDataset"); `pytest -k catalogue` runs them
all. The fixtures below are module-scoped: a test file imports the ones its cases use (Env reaches them by name),
and each file builds its own.
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import os
import re
import shlex
import shutil
import struct
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
from torch.utils.data import IterableDataset

import binlat
import binlat.data.readers as readers_mod
import binlat.editing as editing
import binlat.official as official_mod
import binlat.pipeline as pipeline_mod
from binlat.cli import build_parser, main
from binlat.config import config_from_dict, config_to_dict
from binlat.data.transforms import load_image
from binlat.official import _TOKENIZER_KEYS, convert_config, official_name
from binlat.pipeline import Pipeline
from binlat.serve import ServeLimits, create_app
from binlat.text import TextEncoder
from binlat.tokenizer import BinaryTokenizer, TokenizerConfig
from binlat.train.config import TrainConfig
from binlat.train.engine import Trainer
from tiny_models import TINY_TOKENIZER_MODEL

LOCAL = "http://localhost"  # the server answers only to loopback Host names (TestClient's own is "testserver")
LIMITS = ServeLimits(
    max_concurrent=1, max_queue=4, max_body_bytes=1_000_000, max_n=4, max_steps=8, max_prompt_chars=1000, max_size=128
)
LONG_PROMPT = ("a red circle above a blue square " * 3200)[:100_000]
TOKENIZER_MODEL = TINY_TOKENIZER_MODEL
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


def command_shard(env: Env, scheme: str = "pipe") -> tuple[str, Path]:
    """A shard URL that would leave a marker file if its command ran (a .tar name, so it is read as shards)."""
    marker = env.tmp / "command-ran"
    if scheme == "pipe":
        return f"pipe:touch {marker}; cat {env.tmp / 'x.tar'}", marker
    return f"{scheme}://127.0.0.1:9/$(touch {marker})/x.tar", marker


@pytest.fixture
def env(request, tmp_path, capsys, monkeypatch) -> Env:
    return Env(request, tmp_path, capsys, monkeypatch)


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
