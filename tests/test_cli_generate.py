"""`binlat generate`, in-process through binlat.cli.main (the random tiny model with one shared MiniLM instance:
tests/cli_support.py): images, metadata and grid; one result per seed; the options recorded, AR recording only what
AR decoding uses; blank prompt lines skipped; a second run never overwrites; prompt text never becomes a path; AR
and a saved bundle; bad arguments, prompts files and output folders are one-line errors, --debug shows the
exception."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from PIL import Image

import binlat.pipeline as pipeline_mod
from binlat.commands.common import CLIError
from cli_support import (  # noqa: F401
    assert_one_line_error,
    cli,
    read_meta,
    shared_encoder,
)

META_KEYS = {"file", "prompt", "seed", "generator", "num_steps", "guidance_scale", "temperature", "rho", "protocol"}


def all_files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


# --- generate ------------------------------------------------------------------------------------------------
def test_generate_writes_image_metadata_and_grid(cli, capsys, tmp_path) -> None:
    out = tmp_path / "out"
    code = cli("generate", "a red circle", "--out", out, "--seed", 1, "--steps", 3, "--no-progress", "--grid")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "note" in captured.err and "random" in captured.err  # untrained model is announced
    assert "Traceback" not in captured.err
    image = Image.open(out / "00000.png")
    assert image.size == (64, 64)
    meta = read_meta(out)
    assert len(meta) == 1
    assert META_KEYS <= set(meta[0])
    assert meta[0]["file"] == "00000.png" and meta[0]["prompt"] == "a red circle" and meta[0]["seed"] == 1
    assert meta[0]["generator"] == "diffusion" and meta[0]["num_steps"] == 3
    assert meta[0]["guidance_scale"] == 7.5 and meta[0]["temperature"] == 1.0 and meta[0]["rho"] == 1.0
    assert "cfg" not in meta[0]  # one name for one idea: the one Python and HTTP use
    assert meta[0]["protocol"] == 1
    grids = sorted(p.name for p in out.glob("grid*.png"))
    assert len(grids) == 1
    Image.open(out / grids[0]).verify()
    assert "00000.png" in captured.out


def test_generate_is_reproducible(cli, capsys, tmp_path) -> None:
    for name in ("a", "b"):
        assert (
            cli("generate", "a cat", "a dog", "--out", tmp_path / name, "--seed", 7, "--steps", 2, "--no-progress") == 0
        )
    for f in ("00000.png", "00001.png"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    # image 1 (seed 8) is the same when generated alone with seed 8
    assert cli("generate", "a dog", "--out", tmp_path / "c", "--seed", 8, "--steps", 2, "--no-progress") == 0
    assert (tmp_path / "c" / "00000.png").read_bytes() == (tmp_path / "a" / "00001.png").read_bytes()
    assert [m["seed"] for m in read_meta(tmp_path / "a")] == [7, 8]


def test_generate_options_recorded(cli, capsys, tmp_path) -> None:
    out = tmp_path / "out"
    assert (
        cli(
            "generate",
            "x",
            "--out",
            out,
            "--seed",
            0,
            "--steps",
            2,
            "--cfg",
            0,
            "--temperature",
            0.5,
            "--rho",
            2,
            "--protocol",
            2,
            "--size",
            "64x128",
            "--batch-size",
            1,
            "--no-progress",
        )
        == 0
    )
    m = read_meta(out)[0]
    assert (m["guidance_scale"], m["temperature"], m["rho"], m["protocol"], m["num_steps"]) == (0.0, 0.5, 2.0, 2, 2)
    assert Image.open(out / "00000.png").size == (128, 64)
    # --guidance-scale is the option's name, --cfg its alias: both set the same setting
    assert cli("generate", "x", "--out", out, "--seed", 0, "--steps", 2, "--guidance-scale", 1.25, "--no-progress") == 0
    assert read_meta(out)[1]["guidance_scale"] == 1.25


def test_ar_metadata_records_only_what_ar_decoding_uses(cli, capsys, tmp_path) -> None:
    out = tmp_path / "out"
    assert (
        cli(
            "generate",
            "a red circle",
            "--generator",
            "ar",
            "--out",
            out,
            "--seed",
            0,
            "--guidance-scale",
            2,
            "--temperature",
            0.5,
            "--rho",
            3,
            "--protocol",
            2,
            "--steps",
            9,
            "--no-progress",
        )
        == 0
    )
    m = read_meta(out)[0]
    assert m["generator"] == "ar" and (m["guidance_scale"], m["temperature"]) == (2.0, 0.5)
    # diffusion-only settings were given but AR never reads them: the line must not claim they shaped the image
    assert not {"rho", "protocol", "steps", "num_steps", "cfg"} & set(m), m


def test_prompts_file_skips_blank_lines(cli, capsys, tmp_path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\n   \n  a blue square  \n\n", encoding="utf-8")
    out = tmp_path / "out"
    assert cli("generate", "--prompts", prompts, "--out", out, "--seed", 3, "--steps", 2, "--no-progress") == 0
    meta = read_meta(out)
    assert [m["prompt"] for m in meta] == ["a red circle", "a blue square"]
    assert [m["file"] for m in meta] == ["00000.png", "00001.png"]
    assert [m["seed"] for m in meta] == [3, 4]
    assert sorted(p.name for p in out.glob("*.png")) == ["00000.png", "00001.png"]


def test_second_run_does_not_overwrite(cli, capsys, tmp_path) -> None:
    out = tmp_path / "out"
    assert cli("generate", "first", "--out", out, "--seed", 1, "--steps", 2, "--no-progress", "--grid") == 0
    first = (out / "00000.png").read_bytes()
    assert cli("generate", "second", "third", "--out", out, "--seed", 2, "--steps", 2, "--no-progress", "--grid") == 0
    assert (out / "00000.png").read_bytes() == first
    assert sorted(p.name for p in out.glob("0*.png")) == ["00000.png", "00001.png", "00002.png"]
    meta = read_meta(out)
    assert [(m["file"], m["prompt"]) for m in meta] == [
        ("00000.png", "first"),
        ("00001.png", "second"),
        ("00002.png", "third"),
    ]
    assert len(list(out.glob("grid*.png"))) == 2  # the second grid does not replace the first


def test_prompt_text_never_becomes_a_path(cli, capsys, tmp_path, monkeypatch) -> None:
    work = tmp_path / "work"
    out = work / "deep" / "out"
    work.mkdir()
    monkeypatch.chdir(work)
    before = all_files(tmp_path)
    evil = ["../../etc/passwd", "a/b", "/tmp/x", "..", "con:*?<>|"]
    assert cli("generate", *evil, "--out", out, "--seed", 0, "--steps", 2, "--no-progress", "--grid") == 0
    new = all_files(tmp_path) - before
    assert new and all(out in p.parents for p in new), sorted(map(str, new))
    assert {p.parent for p in new} == {out}
    assert sorted(p.name for p in out.glob("0*.png")) == [f"{i:05d}.png" for i in range(len(evil))]
    assert [m["prompt"] for m in read_meta(out)] == evil  # kept verbatim in the metadata only


def test_generate_ar(cli, capsys, tmp_path) -> None:
    out = tmp_path / "out"
    assert cli("generate", "a red circle", "--generator", "ar", "--out", out, "--seed", 1, "--no-progress") == 0
    meta = read_meta(out)
    assert meta[0]["generator"] == "ar" and meta[0]["file"] == "00000.png"
    assert Image.open(out / "00000.png").size == (64, 64)


def test_generate_from_saved_bundle(cli, capsys, tmp_path, shared_encoder) -> None:
    bundle = pipeline_mod.Pipeline.random_tiny(text_encoder=shared_encoder).save_pretrained(tmp_path / "bundle")
    assert (
        cli("generate", "a cat", "--model", bundle, "--out", tmp_path / "a", "--seed", 4, "--steps", 2, "--no-progress")
        == 0
    )
    assert cli("generate", "a cat", "--out", tmp_path / "b", "--seed", 4, "--steps", 2, "--no-progress") == 0
    # the saved random bundle and the built-in random model are the same network
    assert (tmp_path / "a" / "00000.png").read_bytes() == (tmp_path / "b" / "00000.png").read_bytes()
    assert read_meta(tmp_path / "a")[0]["model"] == str(bundle)


# --- generate: bad arguments -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, needle",
    [
        (["a cat", "--steps", "0"], "steps"),
        (["a cat", "--steps", "two"], "steps"),
        (["a cat", "--cfg", "-1"], "guidance"),
        (["a cat", "--temperature", "nan"], "temperature"),
        (["a cat", "--temperature", "-0.5"], "temperature"),
        (["a cat", "--rho", "0"], "rho"),
        (["a cat", "--protocol", "3"], "protocol"),
        (["a cat", "--size", "abc"], "size"),
        (["a cat", "--size", "65"], "65"),
        (["a cat", "--generator", "gan"], "generator"),
        (["a cat", "--batch-size", "0"], "batch size"),
        ([], "no prompts"),
        (["   "], "empty"),
        (["a cat", "--model", "/nonexistent/binlat-model"], "/nonexistent/binlat-model"),
    ],
)
def test_generate_bad_arguments(cli, capsys, tmp_path, args, needle) -> None:
    out = tmp_path / "out"
    code = cli("generate", *args, "--out", out, "--no-progress")
    err = capsys.readouterr().err
    assert code != 0
    assert_one_line_error(err, needle)
    assert not out.exists() or not list(out.glob("*.png"))


def test_empty_prompts_file(cli, capsys, tmp_path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("\n  \n\n", encoding="utf-8")
    assert cli("generate", "--prompts", f, "--out", tmp_path / "out") != 0
    assert_one_line_error(capsys.readouterr().err, "no prompts")


def test_prompts_file_invalid_utf8(cli, capsys, tmp_path) -> None:
    f = tmp_path / "p.txt"
    f.write_bytes(b"a cat\n\xff\xfe bad\n")
    assert cli("generate", "--prompts", f, "--out", tmp_path / "out") != 0
    assert_one_line_error(capsys.readouterr().err, "UTF-8")


def test_prompts_file_missing(cli, capsys, tmp_path) -> None:
    assert cli("generate", "--prompts", tmp_path / "nope.txt", "--out", tmp_path / "out") != 0
    assert_one_line_error(capsys.readouterr().err, "nope.txt")


@pytest.mark.parametrize("under", [True, False], ids=["under_file", "is_file"])
def test_out_not_writable(cli, capsys, tmp_path, under: bool) -> None:
    blocker = tmp_path / "regular-file"
    blocker.write_text("not a directory")
    out = blocker / "sub" if under else blocker
    assert cli("generate", "a cat", "--out", out, "--steps", 2, "--no-progress") != 0
    assert_one_line_error(capsys.readouterr().err, "output directory")
    assert blocker.read_text() == "not a directory"


def test_debug_shows_the_exception(cli, capsys, tmp_path) -> None:
    with pytest.raises(CLIError, match="no prompts"):
        cli("--debug", "generate", "--out", tmp_path / "out")
