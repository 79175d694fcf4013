"""Exporting a training run (binlat.train.checkpoints.export_run, `binlat export`): the EMA weights of the last or
a named checkpoint as a model folder, in float16 on request, carrying what the run read; a generator run can start
from an exported model's weights."""

from __future__ import annotations

import json

import pytest
import torch

from binlat import cli
from binlat.config import config_to_dict
from binlat.generators import ARTransformer, DiffusionTransformer
from binlat.io import load_safetensors
from binlat.tokenizer import BinaryTokenizer
from binlat.train.checkpoints import export_run, list_checkpoints
from binlat.train.engine import Trainer
from train_support import (  # noqa: F401
    GENERATOR_MODEL,
    _detach_run_logs,
    _one_thread,
    assert_same_tensors,
    cfg_for,
    generator_dict,
    make_cfg,
    state_of,
    step_dir,
    tokenizer_dir,
    tokenizer_run,
)

# trackers: [] keeps runs offline; accelerate warns that no tracker is installed
pytestmark = pytest.mark.filterwarnings("ignore:`log_with=.*no supported trackers:UserWarning")


def test_export_run_writes_ema_weights(tmp_path, tokenizer_run, tokenizer_dir):
    last = list_checkpoints(tokenizer_run)[-1]
    ema, live = load_safetensors(last / "ema.safetensors"), load_safetensors(last / "model.safetensors")
    tok = BinaryTokenizer.from_pretrained(tokenizer_dir)
    assert_same_tensors(tok.state_dict(), ema)
    assert any(not torch.equal(ema[k], live[k]) for k in ema if ema[k].is_floating_point())
    assert config_to_dict(tok.config) == state_of(tokenizer_run, 6)["model_config"]
    # an earlier checkpoint by path, through the CLI
    assert (
        cli.main(
            [
                "export",
                str(tokenizer_run),
                "--out",
                str(tmp_path / "early"),
                "--checkpoint",
                str(step_dir(tokenizer_run, 3)),
            ]
        )
        == 0
    )
    early = BinaryTokenizer.from_pretrained(tmp_path / "early")
    assert_same_tensors(early.state_dict(), load_safetensors(step_dir(tokenizer_run, 3) / "ema.safetensors"))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        export_run(tmp_path / "nothing", tmp_path / "out")


def test_export_in_float16_halves_the_file_and_loads_as_float32(tmp_path, tokenizer_run):
    assert cli.main(["export", str(tokenizer_run), "--out", str(tmp_path / "f32")]) == 0
    assert cli.main(["export", str(tokenizer_run), "--out", str(tmp_path / "f16"), "--dtype", "float16"]) == 0
    stored = load_safetensors(tmp_path / "f16" / "model.safetensors")
    assert {v.dtype for v in stored.values() if v.is_floating_point()} == {torch.float16}
    size = lambda d: (d / "model.safetensors").stat().st_size  # noqa: E731
    assert size(tmp_path / "f16") < 0.55 * size(tmp_path / "f32")
    full, half = (BinaryTokenizer.from_pretrained(tmp_path / d) for d in ("f32", "f16"))
    for name, p in half.state_dict().items():
        assert p.dtype == torch.float32
        torch.testing.assert_close(p, full.state_dict()[name].half().float())


@pytest.mark.parametrize("kind,cls", [("diffusion", DiffusionTransformer), ("ar", ARTransformer)])
def test_export_generator_run(kind, cls, tmp_path, tokenizer_dir, capsys):
    run = tmp_path / "run"
    Trainer(cfg_for(kind, tokenizer_dir, max_steps=2, save_every=2), run).train()
    assert cli.main(["export", str(run), "--out", str(tmp_path / "model")]) == 0
    assert "wrote EMA weights" in capsys.readouterr().out
    model = cls.from_pretrained(tmp_path / "model")
    assert_same_tensors(model.state_dict(), load_safetensors(step_dir(run, 2) / "ema.safetensors"))
    tok = BinaryTokenizer.from_pretrained(tokenizer_dir).config
    assert (model.config.num_bits, model.config.num_tokens) == (tok.num_bits, tok.num_tokens)
    assert model.config.num_layers == 2
    # what the run read travels with its weights, for the model card of a bundle made from them (binlat.card)
    from binlat.card import read_provenance
    from binlat.data.vocabulary import vocabulary_of

    origin = read_provenance(tmp_path / "model")
    cfg = json.loads((run / "config.json").read_text())
    assert (origin["kind"], origin["steps"], origin["data"], origin["image_size"]) == (
        kind,
        2,
        cfg["data"],
        cfg["image_size"],
    )
    assert origin["vocabulary"] == vocabulary_of(cfg["data"]) and origin["vocabulary"]["words"]


@pytest.mark.parametrize("kind,cls", [("diffusion", DiffusionTransformer), ("ar", ARTransformer)])
def test_generator_init_from_starts_at_the_models_weights(kind, cls, tmp_path, tokenizer_dir):
    first = tmp_path / "first"
    Trainer(cfg_for(kind, tokenizer_dir, max_steps=2, save_every=2), first).train()
    export_run(first, tmp_path / "model")
    start = cls.from_pretrained(tmp_path / "model").state_dict()
    over = generator_dict(kind, tokenizer_dir, max_steps=1, save_every=1, lr=1e-2)
    over["generator"]["init_from"] = str(tmp_path / "model")
    trainer = Trainer(make_cfg(over), tmp_path / "tuned")
    # before any step, the live weights and the EMA are the model's; after one, they have moved from there
    assert_same_tensors(trainer.acc.unwrap_model(trainer.model).state_dict(), start)
    trainer.train()
    tuned = trainer.acc.unwrap_model(trainer.model).state_dict()
    assert any(not torch.equal(tuned[k], start[k]) for k in start if start[k].is_floating_point())
    assert state_of(tmp_path / "tuned", 1)["step"] == 1  # a fresh run: its own steps and schedule
    wider = generator_dict(kind, tokenizer_dir, model={**GENERATOR_MODEL, "num_layers": 3})
    wider["generator"]["init_from"] = str(tmp_path / "model")
    with pytest.raises(ValueError, match="num_layers 2 \\(run: 3\\)"):
        Trainer(make_cfg(wider), tmp_path / "wider")
