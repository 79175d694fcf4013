"""`binlat eval shapes`: the shapes benchmark accepts correct images (ground-truth renders score one, held-out
pairs reported apart) and rejects wrong ones (wrong colours score zero where colours are named, a blank generator
fails); the tokenizer-ceiling mode; contact-sheet labels wrap at words."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
from PIL import Image

from binlat.data.shapes import CATEGORIES, HELD_OUT, PALETTE, render, scene_for_caption
from binlat.eval.report import REPORT_KEYS, format_value, parse_table, render_table
from binlat.eval.shapes_eval import SHEET_NAME, run_shapes
from binlat.judge.accuracy import HELD_OUT_CATEGORIES, evaluate_shapes
from binlat.pipeline import Pipeline, PipelineOutput, check_prompts
from eval_support import (  # noqa: F401
    assert_one_line,
    assert_tables_printed,
    bundle,
    run_cli,
)

# ---------------------------------------------------------------- shapes benchmark


def test_ground_truth_renders_score_one_and_held_out_apart(tmp_path) -> None:
    report = run_shapes(None, per_category=8, ground_truth=True, no_tokenizer=True, out=tmp_path)
    s = report["summary"]
    assert s["overall"] >= 0.99
    assert set(s["accuracy"]) == set(CATEGORIES) and all(a >= 0.99 for a in s["accuracy"].values())
    assert set(s["held_out"]["categories"]) == set(HELD_OUT_CATEGORIES) and s["held_out"]["overall"] >= 0.99
    held = [it for it in report["items"] if it["set"] == "held_out"]
    main_items = [it for it in report["items"] if it["set"] == "main"]
    assert len(held) == 16 and len(main_items) == 48
    names = [f"{c} {s}" for c, s in HELD_OUT]
    assert all(any(n in it["prompt"] for n in names) for it in held)
    assert not any(any(n in it["prompt"] for n in names) for it in main_items)
    assert [it["seed"] for it in main_items[:8]] == list(range(8))
    assert s["failures"] == 0 and s["failures_sheet"] is None
    on_disk = json.loads((tmp_path / "report-shapes.json").read_text())
    assert tuple(on_disk) == REPORT_KEYS and on_disk["kind"] == "shapes" and on_disk["model"] is None


def _wrong_colours(prompts: list[str], seed: int) -> list[Image.Image]:
    """Scenes that satisfy each prompt, rendered with every colour swapped for the next palette colour (a
    derangement): shapes, counts and places right, colours all wrong."""
    names = list(PALETTE)
    images = []
    for i, p in enumerate(prompts):
        scene = scene_for_caption(p, np.random.default_rng(seed + i))
        objects = tuple(replace(o, color=names[(names.index(o.color) + 1) % len(names)]) for o in scene.objects)
        images.append(render(replace(scene, objects=objects)))
    return images


def test_wrong_colours_score_zero_where_colours_are_named() -> None:
    result = evaluate_shapes(_wrong_colours, per_category=6)
    acc = result["summary"]["accuracy"]
    assert acc["colors"] == 0 and acc["color_attr"] == 0
    assert all(acc[c] == 1.0 for c in ("single", "two", "counting", "position"))
    assert result["summary"]["held_out"]["overall"] == 0
    assert all("shapes/colours do not match" in f[3]["reason"] for f in result["failures"])


def test_cli_shapes_rejects_blank_generator(bundle, tmp_path, monkeypatch, capsys) -> None:
    calls = []

    def white(self, prompts, kind="diffusion", seed=None, height=None, **kw):
        prompts = check_prompts(prompts)
        calls.append((kind, seed, kw.get("num_steps"), kw.get("guidance_scale"), kw.get("rho"), kw.get("protocol")))
        size = height or self.config.image_size
        return PipelineOutput(
            images=[Image.new("RGB", (size, size), "white") for _ in prompts],
            seeds=[seed + i for i in range(len(prompts))],
            prompts=prompts,
        )

    monkeypatch.setattr(Pipeline, "__call__", white)
    out = tmp_path / "ev"
    code, stdout, err = run_cli(
        capsys,
        "eval",
        "shapes",
        "--model",
        bundle,
        "--per-category",
        3,
        "--steps",
        5,
        "--cfg",
        2.5,
        "--rho",
        1.5,
        "--protocol",
        2,
        "--seed",
        7,
        "--out",
        out,
        "--no-progress",
    )
    assert code == 0, err
    report = json.loads((out / "report-shapes.json").read_text())
    assert tuple(report) == REPORT_KEYS
    s = report["summary"]
    assert s["overall"] == 0 and all(v == 0 for v in s["accuracy"].values()) and s["held_out"]["overall"] == 0
    assert calls and all(c == ("diffusion", 7, 5, 2.5, 1.5, 2) for c in calls)
    arguments = report["arguments"]
    assert arguments["per_category"] == 3 and arguments["guidance_scale"] == 2.5 and "cfg" not in arguments
    assert arguments["rho"] == 1.5 and arguments["protocol"] == 2
    assert report["model"] == str(bundle)
    assert all(it["reason"].startswith("expected") and not it["correct"] for it in report["items"])
    # the failure sheet holds every failure (24 < the cap)
    sheet = Path(s["failures_sheet"])
    assert sheet == out / SHEET_NAME and sheet.is_file() and s["failures_shown"] == s["failures"] == 24
    assert Image.open(sheet).size[0] > 0
    # the printed tables are the JSON's, and their cells are the summary's figures
    assert_tables_printed(report, stdout)
    rows = {r[0]: r[1:] for r in parse_table(render_table(report["tables"][0]))}
    for c in CATEGORIES:
        cat = s["categories"][c]
        assert rows[c] == [format_value(cat["accuracy"]), str(cat["correct"]), str(cat["count"])]
    assert rows["overall (mean of 6)"][0] == format_value(s["overall"])
    held_rows = {r[0]: r[1:] for r in parse_table(render_table(report["tables"][1]))}
    assert held_rows["held-out overall (mean of 2)"][0] == format_value(s["held_out"]["overall"])


def test_cli_shapes_ground_truth_through_tokenizer(bundle, tmp_path, capsys) -> None:
    """The tokenizer-ceiling mode runs with a tokenizer directory alone (a random one scores ~0)."""
    code, stdout, err = run_cli(
        capsys,
        "eval",
        "shapes",
        "--ground-truth",
        "--model",
        bundle / "tokenizer",
        "--per-category",
        2,
        "--no-held-out",
        "--json",
        tmp_path / "r.json",
        "--out",
        tmp_path,
        "--no-progress",
    )
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["summary"]["mode"] == "ground truth through the tokenizer"
    assert report["summary"]["held_out"]["categories"] == {} and len(report["items"]) == 12
    assert_tables_printed(report, stdout)
    code, _, err = run_cli(capsys, "eval", "shapes", "--no-tokenizer", "--out", tmp_path)
    assert code == 2
    assert_one_line(err, "--no-tokenizer only applies with --ground-truth")


def test_contact_sheet_labels_wrap_at_words() -> None:
    """Grid labels are never cut mid-word (issue 27): long prompts wrap, and only past the line limit does the last
    line end in an ellipsis."""
    from binlat.grid import MAX_LABEL_LINES, contact_sheet, label_lines

    prompt = "a photo of a purple triangle to the left of a yellow square on a white background"
    lines = label_lines(prompt, 24)
    assert " ".join(lines) == prompt and all(len(x) <= 24 for x in lines)
    words = set(prompt.split())
    assert all(w in words for x in lines for w in x.split())  # every piece is a whole word
    long = label_lines(" ".join(["circle"] * 60), 24)
    assert len(long) == MAX_LABEL_LINES and long[-1].endswith("…")
    from PIL import Image

    short = contact_sheet([Image.new("RGB", (8, 8))] * 2, ["a", "b"], cell=144)
    tall = contact_sheet([Image.new("RGB", (8, 8))] * 2, [prompt, "b"], cell=144)
    assert tall.height > short.height  # the label rows grow with the wrapped text
