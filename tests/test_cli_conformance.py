"""`binlat conformance` and `binlat convert-official`, in-process through binlat.cli.main: the conformance
fixtures pass, a perturbed output is detected, a bad case folder is one line; an official-format checkpoint converts
and loads with from_pretrained, and missing weights are one line."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from safetensors.torch import load_file, save_file

from binlat import DiffusionTransformer
from cli_support import (  # noqa: F401
    assert_one_line_error,
    cli,
    shared_encoder,
)

FIXTURES = Path(__file__).parent / "fixtures" / "conformance"


# --- conformance and conversion --------------------------------------------------------------------------------
def test_conformance_fixtures_pass(cli, capsys) -> None:
    assert cli("conformance", FIXTURES) == 0
    stdout = capsys.readouterr().out
    expected = {
        "tok_a": ["bits", "decoded", "decoded_random", "encoder_out", "logits", "reconstruction"],
        "tok_b_scaled": ["bits", "decoded", "decoded_random", "encoder_out", "logits", "reconstruction"],
        "diff_a": ["out"],
        "ar_a": ["out_first", "out_prefix"],
    }
    lines = stdout.splitlines()
    for case, outputs in expected.items():
        for name in outputs:
            assert any(line.split()[:2] == [case, name] and line.rstrip().endswith("ok") for line in lines), (
                case,
                name,
                stdout,
            )
    assert sum(line.rstrip().endswith(" ok") for line in lines) == sum(map(len, expected.values()))
    assert "FAIL" not in stdout


def test_conformance_detects_a_perturbed_output(cli, capsys, tmp_path) -> None:
    case = tmp_path / "diff_a"
    shutil.copytree(FIXTURES / "diff_a", case)
    io = load_file(case / "io.safetensors")
    io["out"] = io["out"].clone()
    io["out"][0, 0, 0] += 1e-3  # ten times the tolerance, one element
    save_file(io, case / "io.safetensors")
    assert cli("conformance", case) != 0
    stdout = capsys.readouterr().out
    assert "FAIL" in stdout and "out of tolerance" in stdout


def test_conformance_bad_case_is_one_line(cli, capsys, tmp_path) -> None:
    case = tmp_path / "diff_broken"
    shutil.copytree(FIXTURES / "diff_a", case)
    (case / "weights.safetensors").unlink()
    assert cli("conformance", case) != 0
    assert_one_line_error(capsys.readouterr().err, "weights.safetensors")


def test_convert_official_then_from_pretrained(cli, capsys, tmp_path) -> None:
    out = tmp_path / "converted"
    code = cli(
        "convert-official",
        "--kind",
        "diffusion",
        "--config",
        FIXTURES / "diff_a" / "config.json",
        "--weights",
        FIXTURES / "diff_a" / "weights.safetensors",
        "--out",
        out,
    )
    assert code == 0, capsys.readouterr().err
    model = DiffusionTransformer.from_pretrained(out)
    io = load_file(FIXTURES / "diff_a" / "io.safetensors")
    text = [io[f"llm_features.{i}"] for i in range(len(model.blocks))]
    with torch.inference_mode():
        got = model(io["x_t"], io["timestep"], text, io["text_mask"] > 0.5)
    torch.testing.assert_close(got, io["out"], atol=1e-4, rtol=0)


def test_convert_official_missing_weights(cli, capsys, tmp_path) -> None:
    code = cli(
        "convert-official",
        "--kind",
        "diffusion",
        "--config",
        FIXTURES / "diff_a" / "config.json",
        "--weights",
        tmp_path / "missing.safetensors",
        "--out",
        tmp_path / "converted",
    )
    assert code != 0
    assert_one_line_error(capsys.readouterr().err, "missing.safetensors")
    assert not (tmp_path / "converted").exists()
