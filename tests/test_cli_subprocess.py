"""The `binlat` command as a real subprocess (the console script, or `python -m binlat.cli`): generate writes an
image and its metadata line; errors are one line on stderr, with nothing on stdout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

import binlat.pipeline as pipeline_mod
from cli_support import assert_one_line_error, read_meta


# --- real subprocess runs --------------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("BINLAT_MODEL", None)
    env["HF_HUB_OFFLINE"] = "1"
    return env


def _console_script() -> list[str]:
    script = Path(sys.executable).parent / "binlat"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "binlat.cli"]


def test_subprocess_generate(tmp_path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "binlat.cli",
            "generate",
            "a red circle",
            "--out",
            str(out),
            "--seed",
            "1",
            "--steps",
            "2",
            "--no-progress",
            "--grid",
        ],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    if pipeline_mod.default_model_dir() is None:
        assert "note" in proc.stderr
    assert (out / "00000.png").is_file() and len(read_meta(out)) == 1


@pytest.mark.parametrize(
    "args, needle",
    [
        (["generate", "a cat", "--size", "abc"], "size"),
        (["generate", "a cat", "--model", "/nonexistent/binlat-model"], "/nonexistent/binlat-model"),
    ],
)
def test_subprocess_errors_are_one_line(tmp_path, args, needle) -> None:
    proc = subprocess.run(
        _console_script() + args + ["--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode != 0
    assert_one_line_error(proc.stderr, needle)
    assert proc.stdout == ""
