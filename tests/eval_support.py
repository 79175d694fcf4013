"""What the `binlat eval` test files (tests/test_eval_*.py) share: the CLI run in-process, the one-line failure
check, the check that a report's tables were printed, and a random tiny pipeline bundle (module scope: a file
imports the fixture to use it, and builds its own)."""

from __future__ import annotations

from pathlib import Path

import pytest

from binlat.cli import main
from binlat.eval.report import render_table
from binlat.pipeline import Pipeline


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(err: str, *needles: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def assert_tables_printed(report: dict, stdout: str) -> None:
    """Every table in the JSON is printed verbatim."""
    for table in report["tables"]:
        assert render_table(table) in stdout


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return Pipeline.random_tiny().save_pretrained(tmp_path_factory.mktemp("bundle") / "tiny")
