"""Editing in the binary latent space (binlat.editing) and its CLI commands, on the random tiny model."""

from __future__ import annotations

import inspect
import json
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import binlat.pipeline as pipeline_mod
from binlat import editing
from binlat.cli import main
from binlat.pipeline import BUILTIN_SAMPLING, Pipeline

STEPS = 4


# Bundle settings unlike every built-in one: a function that ignores the bundle's "sampling" gets other bits.
TUNED_SAMPLING = {
    "diffusion": {"num_steps": 3, "guidance_scale": 3.0, "temperature": 0.9, "rho": 1.5, "protocol": 2},
    "ar": {"guidance_scale": 2.0, "temperature": 0.8},
}


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.random_tiny()


@pytest.fixture(scope="module")
def tuned_dir(pipe, tmp_path_factory) -> Path:
    """The tiny bundle on disk with TUNED_SAMPLING in its model_index.json."""
    path = pipe.save_pretrained(tmp_path_factory.mktemp("bundle") / "tuned")
    index = json.loads((path / "model_index.json").read_text())
    (path / "model_index.json").write_text(json.dumps(index | {"sampling": TUNED_SAMPLING}))
    return path


@pytest.fixture(scope="module")
def tuned(pipe, tuned_dir) -> Pipeline:
    return Pipeline.from_pretrained(tuned_dir, text_encoder=pipe.text_encoder)


def picture_a() -> Image.Image:
    image = Image.new("RGB", (96, 80), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((10, 10, 60, 60), fill=(220, 30, 30))
    draw.rectangle((55, 40, 90, 75), fill=(30, 40, 200))
    return image


def picture_b() -> Image.Image:
    return Image.linear_gradient("L").resize((70, 70)).convert("RGB")


def same_images(a: list[Image.Image], b: list[Image.Image]) -> bool:
    return len(a) == len(b) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))


# --- loading ------------------------------------------------------------------------------------------------
def test_load_image_for_resizes_and_centre_crops(pipe) -> None:
    x = editing.load_image_for(pipe, picture_a())
    assert x.shape == (1, 3, 64, 64) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    # Three vertical bands, 3:1: the centre crop keeps only the green middle band.
    bands = Image.new("RGB", (192, 64), (255, 0, 0))
    bands.paste((0, 255, 0), (64, 0, 128, 64))
    bands.paste((0, 0, 255), (128, 0, 192, 64))
    green = editing.load_image_for(pipe, bands)[0]
    assert torch.allclose(green[:, :, 8:-8], torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1), atol=0.05)
    # Other modes and sizes: transparency goes on white, grey becomes RGB, height x width is honoured.
    rgba = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    assert torch.allclose(editing.load_image_for(pipe, rgba), torch.ones(1, 3, 64, 64))
    assert editing.load_image_for(pipe, Image.new("L", (10, 30), 128), 32, 48).shape == (1, 3, 32, 48)


# --- edit ---------------------------------------------------------------------------------------------------
def test_strength_zero_returns_the_reconstruction_exactly(pipe) -> None:
    recon = editing.reconstruct(pipe, picture_a())
    out = editing.edit(pipe, picture_a(), "a green square", strength=0.0, num_steps=STEPS, seed=1)
    assert out.bits.dtype == torch.uint8 and out.bits.shape == (1, 16, 32)
    assert torch.equal(out.bits, recon.bits)
    assert same_images(out.images, recon.images)


def test_strength_one_ignores_the_input_and_equals_plain_generation(tuned) -> None:
    # Settings left out on both sides: each must take the bundle's, so the bits agree.
    a = editing.edit(tuned, picture_a(), "a red circle", strength=1.0, seed=11)
    b = editing.edit(tuned, picture_b(), "a red circle", strength=1.0, seed=11)
    assert not torch.equal(editing.reconstruct(tuned, picture_a()).bits, editing.reconstruct(tuned, picture_b()).bits)
    assert torch.equal(a.bits, b.bits)
    plain = tuned(["a red circle"], seed=11, return_bits=True, progress=False)
    assert torch.equal(a.bits, plain.bits)
    assert same_images(a.images, plain.images)
    builtin = tuned(["a red circle"], seed=11, return_bits=True, progress=False, **BUILTIN_SAMPLING)
    assert not torch.equal(plain.bits, builtin.bits)  # the bundle's settings are what is being compared


def test_edit_takes_the_bundle_settings_a_call_leaves_out(tuned) -> None:
    left_out = editing.edit(tuned, picture_a(), "a blue square", strength=0.5, seed=3)
    explicit = editing.edit(tuned, picture_a(), "a blue square", strength=0.5, seed=3, **TUNED_SAMPLING["diffusion"])
    assert torch.equal(left_out.bits, explicit.bits)
    override = editing.edit(tuned, picture_a(), "a blue square", strength=0.5, seed=3, num_steps=6)
    explicit = editing.edit(
        tuned, picture_a(), "a blue square", strength=0.5, seed=3, **TUNED_SAMPLING["diffusion"] | {"num_steps": 6}
    )
    assert torch.equal(override.bits, explicit.bits) and not torch.equal(override.bits, left_out.bits)


def test_edit_is_seeded_per_image(pipe) -> None:
    two = editing.edit(pipe, picture_a(), "a blue square", strength=0.5, num_steps=STEPS, seed=20, num_images=2)
    assert two.seeds == [20, 21] and two.prompts == ["a blue square"] * 2
    again = editing.edit(pipe, picture_a(), "a blue square", strength=0.5, num_steps=STEPS, seed=21)
    assert torch.equal(two.bits[1:], again.bits)
    assert not torch.equal(two.bits[0], two.bits[1])


# --- interpolate --------------------------------------------------------------------------------------------
def test_interpolation_goes_from_a_to_b_monotonically(pipe) -> None:
    bits_a = editing.reconstruct(pipe, picture_a()).bits
    bits_b = editing.reconstruct(pipe, picture_b()).bits
    frames = editing.interpolation_bits(bits_a, bits_b, steps=6, seed=3)
    assert frames.shape == (6, 16, 32)
    assert torch.equal(frames[0], bits_a[0]) and torch.equal(frames[-1], bits_b[0])
    distance = [int((f != bits_a[0]).sum()) for f in frames]
    assert distance == sorted(distance) and distance[0] == 0
    assert distance[-1] == int((bits_a != bits_b).sum()) > 0
    assert len(set(distance)) > 2  # intermediate frames really are in between
    images = editing.interpolate(pipe, picture_a(), picture_b(), steps=6, seed=3)
    assert len(images) == 6 and all(im.size == (64, 64) for im in images)
    assert same_images(images[:1], editing.reconstruct(pipe, picture_a()).images)
    assert same_images(images[-1:], editing.reconstruct(pipe, picture_b()).images)
    sheet = editing.strip(images)
    assert sheet.size == (6 * 64, 64)


# --- AR continuation ----------------------------------------------------------------------------------------
def test_continue_ar_keeps_the_prefix(pipe) -> None:
    recon = editing.reconstruct(pipe, picture_a()).bits
    full = editing.continue_ar(pipe, picture_a(), "a red circle", keep_tokens=16, seed=0)
    assert torch.equal(full.bits, recon)
    part = editing.continue_ar(pipe, picture_a(), "a red circle", keep_tokens=5, seed=0)
    assert torch.equal(part.bits[:, :5], recon[:, :5])
    assert not torch.equal(part.bits, recon)


def test_continue_ar_takes_the_bundle_settings_a_call_leaves_out(tuned) -> None:
    none = editing.continue_ar(tuned, picture_a(), "a red circle", keep_tokens=0, seed=4)
    plain = tuned(["a red circle"], kind="ar", seed=4, return_bits=True, progress=False)
    assert torch.equal(none.bits, plain.bits)
    part = editing.continue_ar(tuned, picture_a(), "a red circle", keep_tokens=5, seed=4)
    explicit = editing.continue_ar(tuned, picture_a(), "a red circle", keep_tokens=5, seed=4, **TUNED_SAMPLING["ar"])
    builtin = editing.continue_ar(
        tuned,
        picture_a(),
        "a red circle",
        keep_tokens=5,
        seed=4,
        guidance_scale=BUILTIN_SAMPLING["guidance_scale"],
        temperature=BUILTIN_SAMPLING["temperature"],
    )
    assert torch.equal(part.bits, explicit.bits) and not torch.equal(part.bits, builtin.bits)


# --- bad arguments ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strength", [-0.1, 1.01, math.nan, math.inf, "0.5", True, None])
def test_bad_strength(pipe, strength) -> None:
    with pytest.raises(ValueError, match="strength"):
        editing.edit(pipe, picture_a(), "x", strength=strength)


def test_bad_arguments_raise_value_errors(pipe) -> None:
    a = picture_a()
    with pytest.raises(ValueError, match="steps"):
        editing.interpolate(pipe, a, a, steps=1)
    with pytest.raises(ValueError, match="steps"):
        editing.edit(pipe, a, "x", num_steps=0)
    for keep in (-1, 17, 2.5, True):
        with pytest.raises(ValueError, match="keep_tokens"):
            editing.continue_ar(pipe, a, "x", keep_tokens=keep)
    with pytest.raises(ValueError, match="empty"):
        editing.edit(pipe, a, "   ")
    with pytest.raises(ValueError, match="prompt"):
        editing.edit(pipe, a, ["x", "y"])
    with pytest.raises(ValueError, match="not supported"):
        editing.edit(pipe, a, "x", height=50)
    with pytest.raises(ValueError, match="PIL"):
        editing.load_image_for(pipe, np.zeros((64, 64, 3)))
    with pytest.raises(ValueError, match="guidance"):
        editing.edit(pipe, a, "x", guidance_scale=-1)
    diffusion_only = Pipeline(pipe.tokenizer, pipe.text_encoder, diffusion=pipe.generators["diffusion"])
    with pytest.raises(ValueError, match="ar generator"):
        editing.continue_ar(diffusion_only, a, "x", keep_tokens=3)
    ar_only = Pipeline(pipe.tokenizer, pipe.text_encoder, ar=pipe.generators["ar"])
    with pytest.raises(ValueError, match="diffusion generator"):
        editing.edit(ar_only, a, "x")


def test_edit_and_continue_ar_show_every_option() -> None:
    """The options edit and continue_ar share are declared once (editing._options); their signatures, as help()
    and inspect show them, still list each one after the function's own parameters."""
    shared = ["seed", "height", "width", "num_images", "progress", "settings"]
    assert list(inspect.signature(editing.edit).parameters) == ["pipe", "image", "prompt", "strength", *shared]
    assert list(inspect.signature(editing.continue_ar).parameters) == [
        "pipe",
        "image",
        "prompt",
        "keep_tokens",
        *shared,
    ]
    for function in (editing.edit, editing.continue_ar):
        parameters = inspect.signature(function).parameters
        assert parameters["num_images"].default == 1 and parameters["progress"].default is False
        assert parameters["seed"].kind is inspect.Parameter.KEYWORD_ONLY


@pytest.mark.parametrize(("seed", "count"), [(True, 1), (2.7, 1), ("7", 1), (-1, 1), (2**64, 1), (2**64 - 1, 2)])
def test_generation_and_editing_refuse_a_bad_seed_with_the_same_words(pipe, seed, count) -> None:
    """Issue 28: a seed is one check (binlat.validators.check_seed) wherever it is given, so True and 2.7 are
    refused by generation as by editing, not taken as 1 and 2 by one of them."""
    a = picture_a()
    calls = {
        "pipeline": lambda: pipe(["x"] * count, seed=seed, num_steps=STEPS),
        "edit": lambda: editing.edit(pipe, a, "x", strength=0.5, num_steps=STEPS, seed=seed, num_images=count),
        "continue_ar": lambda: editing.continue_ar(pipe, a, "x", keep_tokens=5, seed=seed, num_images=count),
        "interpolate": lambda: editing.interpolate(pipe, a, a, seed=seed),
    }
    if count > 1:  # interpolate makes its frames from one seed
        del calls["interpolate"]
    messages = {}
    for name, call in calls.items():
        with pytest.raises(ValueError, match="^seed must be an integer") as caught:
            call()
        messages[name] = str(caught.value)
    assert len(set(messages.values())) == 1, messages


def test_open_image_names_the_problem(tmp_path) -> None:
    with pytest.raises(ValueError, match="not a recognised image"):
        editing.open_image(b"definitely not a png")
    truncated = tmp_path / "cut.png"
    picture_a().save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(ValueError, match="cut.png"):
        editing.open_image(truncated)
    with pytest.raises(OSError, match="missing.png"):
        editing.open_image(tmp_path / "missing.png")
    bits = torch.randint(0, 2, (16, 32), dtype=torch.uint8)
    assert torch.equal(editing.unpack_bits_hex(editing.pack_bits_hex(bits), 16, 32), bits)


# --- CLI ----------------------------------------------------------------------------------------------------
@pytest.fixture
def cli(monkeypatch, pipe, tmp_path):
    """main(argv) in-process with no trained model installed (the random tiny model, shared with these tests)."""
    monkeypatch.delenv("BINLAT_MODEL", raising=False)
    monkeypatch.setattr(pipeline_mod, "default_model_dir", lambda: None)
    monkeypatch.setattr(pipeline_mod.Pipeline, "random_tiny", classmethod(lambda cls, *a, **k: pipe))

    def run(*argv) -> int:
        try:
            return main([str(a) for a in argv])
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else 1

    return run


@pytest.fixture
def images(tmp_path) -> tuple[Path, Path]:
    a, b = tmp_path / "a.png", tmp_path / "b.jpg"
    picture_a().save(a)
    picture_b().save(b)
    return a, b


def one_line_error(err: str, *needles: str) -> None:
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip() and not line.startswith("note:")]
    assert len(lines) == 1 and "error" in lines[0], err
    for needle in needles:
        assert needle in lines[-1], (needle, err)


def read_meta(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]


def test_cli_edit_interpolate_continue_write_files(cli, images, tmp_path, capsys, pipe) -> None:
    a, b = images
    out = tmp_path / "out"
    assert (
        cli("edit", a, "--prompt", "a green square", "--strength", "0", "--seed", 5, "--out", out, "--no-progress") == 0
    )
    meta = read_meta(out)
    assert meta[0]["file"] == "00000.png" and meta[0]["kind"] == "edit" and meta[0]["strength"] == 0
    assert same_images([Image.open(out / "00000.png").convert("RGB")], editing.reconstruct(pipe, picture_a()).images)

    assert cli("interpolate", a, b, "--steps", 3, "--out", out) == 0
    assert sorted(p.name for p in out.glob("strip-*.png")) == ["strip-00001.png"]
    assert Image.open(out / "strip-00001.png").size == (3 * 64, 64)
    assert [m["frame"] for m in read_meta(out)[1:]] == [0, 1, 2]
    assert all((out / f"{i:05d}.png").is_file() for i in range(1, 4))

    assert (
        cli("continue", a, "--prompt", "a red circle", "--keep-tokens", 6, "--seed", 2, "--out", out, "--no-progress")
        == 0
    )
    last = read_meta(out)[-1]
    assert last["file"] == "00004.png" and last["kind"] == "continue" and last["keep_tokens"] == 6
    assert "Traceback" not in capsys.readouterr().err


def test_cli_edit_and_continue_use_the_bundle_settings(cli, images, tmp_path, tuned_dir) -> None:
    a = images[0]
    out = tmp_path / "out"
    common = ("--model", tuned_dir, "--seed", 7, "--out", out, "--no-progress")
    assert cli("generate", "a red circle", *common) == 0
    assert cli("edit", a, "--prompt", "a red circle", "--strength", 1, *common) == 0
    assert cli("continue", a, "--prompt", "a red circle", "--keep-tokens", 5, *common) == 0
    generated, edited, continued = read_meta(out)
    tuned = TUNED_SAMPLING["diffusion"]
    for row in (generated, edited):  # the settings used are recorded, and they are the bundle's
        assert (row["num_steps"], row["guidance_scale"], row["temperature"], row["rho"], row["protocol"]) == (
            tuned["num_steps"],
            tuned["guidance_scale"],
            tuned["temperature"],
            tuned["rho"],
            tuned["protocol"],
        )
    assert (continued["guidance_scale"], continued["temperature"]) == (
        TUNED_SAMPLING["ar"]["guidance_scale"],
        TUNED_SAMPLING["ar"]["temperature"],
    )
    assert not {"num_steps", "steps", "rho", "protocol"} & set(continued)  # AR continuation reads none of them
    assert same_images(
        [Image.open(out / generated["file"]).convert("RGB")], [Image.open(out / edited["file"]).convert("RGB")]
    )


@pytest.mark.parametrize(
    "argv, needle",
    [
        (("edit", "{missing}", "--prompt", "x"), "cannot read image"),
        (("edit", "{text}", "--prompt", "x"), "not a recognised image"),
        (("edit", "{a}", "--prompt", "x", "--strength", "1.5"), "strength"),
        (("edit", "{a}", "--prompt", "  "), "empty"),
        (("interpolate", "{a}", "{missing}"), "cannot read image"),
        (("interpolate", "{a}", "{a}", "--steps", "1"), "steps"),
        (("continue", "{a}", "--prompt", "x", "--keep-tokens", "17"), "keep_tokens"),
        (("continue", "{text}", "--prompt", "x", "--keep-tokens", "1"), "not a recognised image"),
    ],
)
def test_cli_bad_inputs_exit_with_one_line(cli, images, tmp_path, capsys, argv, needle) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    names = {"missing": tmp_path / "missing.png", "text": text, "a": images[0]}
    argv = [str(x).format(**names) for x in argv] + ["--out", str(tmp_path / "out")]
    code = cli(*argv)
    assert code != 0
    one_line_error(capsys.readouterr().err, needle)
    assert not list(tmp_path.glob("out/*.png"))  # nothing written
