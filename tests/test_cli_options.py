"""What the `binlat` commands share: presets and the shipped model resolve by name from any folder; --threads is
on every computing command and applied before it runs, and --guidance-scale and --num-steps (diffusers' names) are
the same options as --cfg and --steps; `config show` lists every key with its type, default and help."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from binlat.cli import main


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
