"""What the `binlat` command's test files (tests/test_cli_*.py) share: `cli`, which runs binlat.cli.main in-process
with no trained model installed (the random tiny model, with one shared MiniLM instance: the module-scoped
`shared_encoder`, so each generate call takes well under a second; a file imports both fixtures to use them), the
reader of an output folder's metadata.jsonl, and the one-line error check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import binlat.pipeline as pipeline_mod
from binlat.cli import main
from binlat.text import TextEncoder


@pytest.fixture(scope="module")
def shared_encoder() -> TextEncoder:
    return TextEncoder()


@pytest.fixture
def cli(monkeypatch, shared_encoder):
    """Run main(argv) in-process with no trained model installed; return the exit code (argparse's too)."""
    monkeypatch.delenv("BINLAT_MODEL", raising=False)
    monkeypatch.setattr(pipeline_mod, "default_model_dir", lambda: None)
    real = pipeline_mod.Pipeline.random_tiny.__func__

    def random_tiny(cls, seed=0, text_encoder=None):
        return real(cls, seed, text_encoder or shared_encoder)

    monkeypatch.setattr(pipeline_mod.Pipeline, "random_tiny", classmethod(random_tiny))

    def run(*argv: str) -> int:
        try:
            return main([str(a) for a in argv])
        except SystemExit as e:  # argparse errors
            return e.code if isinstance(e.code, int) else 1

    return run


def read_meta(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]


def assert_one_line_error(err: str, *needles: str) -> None:
    """No traceback; the message is a single final line (argparse may print its usage block above it)."""
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines, "no error message"
    last = lines[-1]
    assert "error" in last, err
    assert sum("error" in line for line in lines) == 1, err
    for needle in needles:
        assert needle in last, (needle, last)
