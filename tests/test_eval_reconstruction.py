"""`binlat eval reconstruction`: a random tiny pipeline's tokenizer measured against codecs at its byte budget, a
report and its tables; identical images score perfectly, LPIPS with a stand-in VGG16; errors are one line."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

import binlat.eval.reconstruction as rec
import binlat.metrics as metrics
from binlat.data.shapes import render, scene_for_caption, to_tensor
from binlat.eval.report import REPORT_KEYS, format_value, parse_table, render_table
from eval_support import (  # noqa: F401
    assert_one_line,
    assert_tables_printed,
    bundle,
    run_cli,
)

# ---------------------------------------------------------------- reconstruction


def test_cli_reconstruction_random_tiny(bundle, tmp_path, capsys) -> None:
    out = tmp_path / "ev"
    code, stdout, err = run_cli(
        capsys,
        "eval",
        "reconstruction",
        "--model",
        bundle,
        "--data",
        "shapes",
        "--num-images",
        8,
        "--batch-size",
        3,
        "--out",
        out,
        "--no-progress",
    )
    assert code == 0, err
    assert "LPIPS not available" in err
    report = json.loads((out / "report-reconstruction.json").read_text())
    assert tuple(report) == REPORT_KEYS and report["kind"] == "reconstruction"
    s = report["summary"]
    assert s["num_images"] == 8 and len(report["items"]) == 8
    assert s["bits_per_image"] == 16 * 32 and s["budget_bytes"] == 64
    assert s["lpips"]["available"] is False and "--lpips-weights" in s["lpips"]["reason"]
    assert report["arguments"]["data"] == "shapes" and report["arguments"]["eval_shapes_seed"] == rec.EVAL_SHAPES_SEED
    for codec in ("jpeg", "webp"):
        for it in report["items"]:
            c = it[codec]
            assert c["fits"] == (c["bytes"] <= 64) and 1 <= c["quality"] <= 100
        assert s[codec]["mean_bytes"] == pytest.approx(np.mean([it[codec]["bytes"] for it in report["items"]]))
    assert s["tokenizer"]["psnr"] == pytest.approx(np.mean([it["tokenizer"]["psnr"] for it in report["items"]]))
    assert Path(s["examples_sheet"]).is_file()
    assert_tables_printed(report, stdout)
    rows = {r[0]: r[1:] for r in parse_table(render_table(report["tables"][0]))}
    assert rows["binlat tokenizer"][1:3] == [format_value(s["tokenizer"]["psnr"]), format_value(s["tokenizer"]["ssim"])]
    assert rows["WebP"][0] == format_value(s["webp"]["mean_bytes"])

    # A tokenizer directory works as --model too, and the same images give the same figures.
    code, _, err = run_cli(
        capsys,
        "eval",
        "reconstruction",
        "--model",
        bundle / "tokenizer",
        "--num-images",
        8,
        "--json",
        tmp_path / "tok.json",
        "--out",
        tmp_path,
        "--no-progress",
    )
    assert code == 0, err
    again = json.loads((tmp_path / "tok.json").read_text())
    assert again["summary"]["tokenizer"] == s["tokenizer"]


def test_reconstruction_identical_images_and_lpips(tmp_path, random_vgg16) -> None:
    """A tokenizer stand-in that returns its input exactly: PSNR at its cap (counted as exact), SSIM 1, LPIPS 0
    (random VGG weights)."""
    lpips, status = rec.load_lpips(random_vgg16)
    assert status["available"] and lpips is not None

    class Identity(torch.nn.Module):
        config = type("C", (), {"num_tokens": 4, "num_bits": 16, "image_size": 64})()

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def check_size(self, h, w):
            pass

        def encode(self, x):
            return x

        def decode(self, bits, h, w):
            return bits

    data = [
        {"image": to_tensor(render(scene_for_caption("a red circle", np.random.default_rng(i)))), "caption": ""}
        for i in range(2)
    ]
    result = rec.evaluate_reconstruction(Identity(), data, 2, 64, lpips=lpips)
    t = result["summary"]["tokenizer"]
    assert (
        t["psnr"] == metrics.PSNR_CAP_DB
        and t["exact"] == 2
        and t["ssim"] == pytest.approx(1.0)
        and t["lpips"] == pytest.approx(0.0, abs=1e-6)
    )
    assert result["summary"]["budget_bytes"] == 8 and result["items"][0]["jpeg"]["lpips"] > 0
    with pytest.raises(FileNotFoundError, match="--lpips-weights"):
        rec.load_lpips(tmp_path / "missing.safetensors")


def test_reconstruction_errors_are_one_line(tmp_path, capsys) -> None:
    code, _, err = run_cli(capsys, "eval", "reconstruction", "--model", tmp_path / "nope", "--out", tmp_path)
    assert code == 1
    assert_one_line(err, "does not exist")
    code, _, err = run_cli(capsys, "eval", "reconstruction", "--model", tmp_path, "--out", tmp_path)
    assert code == 1
    assert_one_line(err, "neither a pipeline bundle")
