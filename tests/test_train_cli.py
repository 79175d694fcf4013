"""`binlat train` on the command line: a config of another kind, and --resume latest without a checkpoint, are
one-line errors; --max-steps, --batch-size and --data override the config, and --resume latest/auto continue a
run; --set reaches nested and typed keys, and an error it brings names the entry; a preset that needs a key only
the user can give stops before making a run folder."""

from __future__ import annotations

import json

import pytest

from binlat import cli
from binlat.train.checkpoints import list_checkpoints
from binlat.train.engine import Trainer
from train_support import (  # noqa: F401
    _detach_run_logs,
    _one_thread,
    make_cfg,
    metrics,
    tokenizer_dict,
)

# trackers: [] keeps runs offline; accelerate warns that no tracker is installed
pytestmark = pytest.mark.filterwarnings("ignore:`log_with=.*no supported trackers:UserWarning")


def test_cli_train_wrong_kind_is_one_line_error(tmp_path, capsys):
    config = tmp_path / "tok.json"
    config.write_text(json.dumps(tokenizer_dict()))
    rc = cli.main(["train", "diffusion", "--config", str(config), "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc != 0
    assert err.count("\n") == 1 and err.startswith("binlat: error:") and "tokenizer config, not diffusion" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_cli_resume_latest_without_checkpoint_is_clear_error(tmp_path, capsys):
    config = tmp_path / "tok.json"
    config.write_text(json.dumps(tokenizer_dict()))
    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000003").mkdir(parents=True)  # a save that never completed: no state.json
    rc = cli.main(["train", "tokenizer", "--config", str(config), "--output", str(run), "--resume", "latest"])
    err = capsys.readouterr().err
    assert rc != 0
    assert err.count("\n") == 1 and err.startswith("binlat: error:")
    assert "--resume latest: no checkpoint" in err and str(run / "checkpoints") in err
    assert not (run / "config.json").exists()  # nothing was started


def test_cli_train_with_overrides(tmp_path, capsys):
    config = tmp_path / "tok.json"
    config.write_text(json.dumps(tokenizer_dict(max_steps=50)))
    run = tmp_path / "run"
    assert (
        cli.main(
            [
                "train",
                "tokenizer",
                "--config",
                str(config),
                "--output",
                str(run),
                "--max-steps",
                "2",
                "--batch-size",
                "4",
                "--data",
                "shapes",
            ]
        )
        == 0
    )
    assert "finished tokenizer training at step 2" in capsys.readouterr().out
    saved = json.loads((run / "config.json").read_text())
    assert saved["max_steps"] == 2 and saved["batch_size"] == 4
    assert [p.name for p in list_checkpoints(run)] == ["step-00000002"]
    # and it continues from there with --resume latest
    assert (
        cli.main(
            [
                "train",
                "tokenizer",
                "--config",
                str(config),
                "--output",
                str(run),
                "--max-steps",
                "3",
                "--batch-size",
                "4",
                "--resume",
                "latest",
            ]
        )
        == 0
    )
    assert "at step 3" in capsys.readouterr().out
    assert [r["step"] for r in metrics(run)][-1] == 3
    # --resume auto: continues when there is a checkpoint, starts fresh when there is none
    assert (
        cli.main(
            [
                "train",
                "tokenizer",
                "--config",
                str(config),
                "--output",
                str(run),
                "--max-steps",
                "4",
                "--batch-size",
                "4",
                "--resume",
                "auto",
            ]
        )
        == 0
    )
    assert [r["step"] for r in metrics(run)][-1] == 4
    assert (
        cli.main(
            [
                "train",
                "tokenizer",
                "--config",
                str(config),
                "--output",
                str(tmp_path / "new"),
                "--max-steps",
                "1",
                "--batch-size",
                "4",
                "--resume",
                "auto",
            ]
        )
        == 0
    )
    assert [p.name for p in list_checkpoints(tmp_path / "new")] == ["step-00000001"]


def test_cli_train_set_overrides_nested_and_typed_entries(tmp_path, capsys):
    config = tmp_path / "tok.json"
    config.write_text(json.dumps(tokenizer_dict(max_steps=50)))
    run = tmp_path / "run"
    assert (
        cli.main(
            [
                "train",
                "tokenizer",
                "--config",
                str(config),
                "--output",
                str(run),
                "--max-steps",
                "1",
                "--set",
                "lr=2e-4",
                "--set",
                "tokenizer.tau_end=0.25",
                "--set",
                'sample_prompts=["a b"]',
                "--set",
                "trackers=[]",
            ]
        )
        == 0
    )
    saved = json.loads((run / "config.json").read_text())
    assert saved["lr"] == 2e-4 and saved["tokenizer"]["tau_end"] == 0.25 and saved["sample_prompts"] == ["a b"]
    capsys.readouterr()
    for bad, why in (
        ("lr", "KEY=VALUE"),
        ("nope=1", "unknown key"),
        ("lr=fast", "must be a number"),
        ("max_steps.x=1", "not a section"),
    ):
        assert (
            cli.main(["train", "tokenizer", "--config", str(config), "--output", str(tmp_path / "x"), "--set", bad])
            != 0
        )
        assert why in capsys.readouterr().err, bad


def test_the_decoder_stage_preset_asks_for_the_tokenizer_it_starts_from(tmp_path, monkeypatch):
    """tokenizer/shapes-64-decoder freezes a trained encoder; a preset cannot know where the user's is, so it names
    none, and a run without --set tokenizer.init_from stops before making a run folder, naming the key."""
    from binlat.config import resolve_config

    cfg = make_cfg(json.loads(resolve_config("tokenizer/shapes-64-decoder").read_text()))
    assert cfg.tokenizer.freeze_encoder and cfg.tokenizer.init_from is None
    with pytest.raises(ValueError, match=r"freeze_encoder trains only the decoder.*--set tokenizer.init_from=DIR"):
        Trainer(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_bad_set_value_is_named_as_the_set_entry(tmp_path, capsys):
    """An error that a --set entry brought names that entry, not the preset file it was laid over; the file's own
    errors still name the file."""
    from binlat.config import ConfigError, load_config
    from binlat.train.config import TrainConfig

    run = tmp_path / "run"
    rc = cli.main(["train", "diffusion", "--config", "diffusion/shapes-64", "--output", str(run), "--set", "lr=abc"])
    err = capsys.readouterr().err
    assert rc == 2 and err == "binlat: error: --set lr=abc: 'lr' must be a number, got 'abc'\n", err
    assert not run.exists()
    # A value its type allows but the config refuses: the last of two entries for the key is the one named
    with pytest.raises(ConfigError, match=r"^--set lr=-1: lr must be a finite number > 0, got -1"):
        load_config(TrainConfig, "diffusion/shapes-64", ["lr=2e-4", "lr=-1"])
    with pytest.raises(ConfigError, match=r"^--set model\.bit_groups=2: model: bit_groups is the AR generator's"):
        load_config(TrainConfig, "diffusion/shapes-64", ["max_steps=5", "model.bit_groups=2"])
    config = tmp_path / "tok.json"
    config.write_text(json.dumps(tokenizer_dict() | {"lr": "abc"}))
    with pytest.raises(ConfigError, match=rf"^{config}: 'lr' must be a number"):
        load_config(TrainConfig, config, ["max_steps=5"])  # the file's fault, with an entry that has none
    # The file's fault mended by one entry and another entry at fault: that entry is named
    with pytest.raises(ConfigError, match=r"^--set max_steps=0: max_steps must be"):
        load_config(TrainConfig, config, ["lr=1e-4", "max_steps=0"])
    assert load_config(TrainConfig, config, ["lr=1e-4"]).lr == 1e-4
    listed = tmp_path / "list.json"
    listed.write_text("[1]")  # no object to lay the entry over: the file is named (was a TypeError)
    with pytest.raises(ConfigError, match=rf"^{listed}: expected a JSON object"):
        load_config(TrainConfig, listed, ["lr=1e-4"])
