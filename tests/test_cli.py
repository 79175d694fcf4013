"""The `binlat` command, in-process through binlat.cli.main and as a real subprocess.

In-process runs use the random tiny model (no trained bundle is installed) with one shared MiniLM instance,
so each generate call takes well under a second."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import binlat.pipeline as pipeline_mod
from binlat import DiffusionTransformer
from binlat.cli import main
from binlat.commands.common import CLIError
from binlat.text import TextEncoder

FIXTURES = Path(__file__).parent / "fixtures" / "conformance"
META_KEYS = {"file", "prompt", "seed", "generator", "num_steps", "guidance_scale", "temperature", "rho", "protocol"}


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


def test_presets_and_the_shipped_model_resolve_by_name_from_any_folder(tmp_path, monkeypatch):
    """Issue 27: `--config diffusion/shapes-64` (or the README's configs/... path, or a unique bare name) finds the
    packaged preset from a folder outside the repository, and "default[/part]" names the shipped model."""
    from binlat.config import ConfigError, preset_names, resolve_config
    from binlat.modeling import default_model_dir, named_model_dir

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BINLAT_MODEL", raising=False)
    assert "tokenizer/shapes-64" in preset_names() and "diffusion/shapes-64" in preset_names()
    for name in ("diffusion/shapes-64", "configs/diffusion/shapes-64.json", "diffusion/shapes-64.json"):
        assert resolve_config(name).name == "shapes-64.json" and resolve_config(name).parent.name == "diffusion"
    assert resolve_config("shapes-64", kind="ar").parent.name == "ar"
    assert resolve_config("shapes-64-stage1").parent.name == "tokenizer"  # unique without a kind
    with pytest.raises(ConfigError, match="more than one preset"):
        resolve_config("shapes-64")
    with pytest.raises(ConfigError, match="no preset of that name.*diffusion/shapes-64"):
        resolve_config("shapes-65", kind="diffusion")
    local = tmp_path / "mine.json"
    local.write_text("{}")
    assert resolve_config("mine.json") == Path("mine.json")  # a file wins
    for preset in ("diffusion/shapes-64", "ar/shapes-64"):  # presets never name a repo path
        assert json.loads(resolve_config(preset).read_text())["generator"]["tokenizer"] == "default/tokenizer"

    def strings(value):
        if isinstance(value, dict):
            return [s for v in value.values() for s in strings(v)]
        return [s for v in value for s in strings(v)] if isinstance(value, list) else [value]

    for name in preset_names():  # no preset holds a path of this repository's folders (runs/, models/, configs/)
        found = [s for s in strings(json.loads(resolve_config(name).read_text())) if isinstance(s, str)]
        assert not [s for s in found if s.split("/")[0] in ("runs", "models", "configs")], (name, found)
    if default_model_dir() is None:
        pytest.skip("no shipped model in this installation")
    assert named_model_dir("default") == default_model_dir()
    assert named_model_dir("default/tokenizer") == default_model_dir() / "tokenizer"
    assert named_model_dir("other/tokenizer") is None
    from binlat.tokenizer import BinaryTokenizer

    assert BinaryTokenizer.from_pretrained("default/tokenizer").config.num_bits > 0
    from binlat.release import resolve_pipeline_dir

    assert resolve_pipeline_dir("default") == default_model_dir()


def test_threads_on_every_computing_command_and_diffusers_names_for_sampling(monkeypatch):
    """Issue 27: --threads N is on generate, train, precompute, every eval, bench and serve (and applied before the
    command runs); --cfg and --num-steps are the same options as --guidance-scale and --steps."""
    from binlat.cli import build_parser

    parser = build_parser()
    for argv in (
        ["generate", "x"],
        ["train", "diffusion", "--config", "c"],
        ["precompute", "--tokenizer", "t", "--data", "d", "--out", "o"],
        ["eval", "shapes"],
        ["eval", "fid", "--real", "a", "--fake", "b"],
        ["bench"],
        ["serve"],
    ):
        assert parser.parse_args([*argv, "--threads", "3"]).threads == 3, argv
    a = parser.parse_args(["generate", "x", "--guidance-scale", "2.5", "--num-steps", "7"])
    b = parser.parse_args(["generate", "x", "--cfg", "2.5", "--steps", "7"])
    assert (a.guidance_scale, a.steps) == (b.guidance_scale, b.steps) == (2.5, 7)
    import binlat.cli as cli_mod

    seen = []
    monkeypatch.setattr(torch, "set_num_threads", seen.append)
    monkeypatch.setattr(cli_mod, "build_parser", lambda: _stub_parser(build_parser()))
    assert cli_mod.main(["params", "diffusion/shapes-64"]) == 0 and seen == []  # params computes nothing
    assert cli_mod.main(["eval", "shapes", "--threads", "2"]) == 0 and seen == [2]


def _stub_parser(parser):
    """The real parser, with every command's function replaced by one that returns 0."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                _stub_parser(command)
                if command.get_default("func"):
                    command.set_defaults(func=lambda args: 0)
    return parser


def test_config_show_lists_every_key_with_type_default_and_help(capsys):
    """Issue 27: `binlat config show PRESET [--set ...]` prints every key --set takes, from the dataclasses."""
    import dataclasses

    from binlat.generators import DiffusionConfig
    from binlat.train.config import GeneratorTraining, TokenizerTraining, TrainConfig

    assert main(["config", "show", "diffusion/shapes-64", "--set", "lr=2e-4"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    keys = {line.split(" = ")[0] for line in lines}
    want = {f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("model", "tokenizer", "generator")}
    want |= {f"tokenizer.{f.name}" for f in dataclasses.fields(TokenizerTraining)}
    want |= {f"generator.{f.name}" for f in dataclasses.fields(GeneratorTraining)}
    want |= {f"model.{f.name}" for f in dataclasses.fields(DiffusionConfig)}  # the diffusion kind's own class
    assert keys == want
    line = next(x for x in lines if x.startswith("lr = "))
    assert "lr = 0.0002" in line and "[float; default 0.0003]" in line and "learning rate" in line
    assert any(x.startswith("model.text_refiner_layers = 0") and "refiner" in x for x in lines)
    assert main(["config", "show", "no-such-preset"]) == 2
