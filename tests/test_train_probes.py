"""`binlat probe` (binlat.probe): a short run that trains, scores and appends one row to probes.jsonl, for the
tokenizer, diffusion and an AR generator with a grouped head; the validation loss generators are scored by early
is a function of the weights."""

from __future__ import annotations

import json
import math

import pytest
import torch

from binlat import cli
from binlat.generators import ARTransformer
from binlat.train.checkpoints import list_checkpoints
from binlat.train.tasks import GeneratorTask
from train_support import (  # noqa: F401
    _detach_run_logs,
    _one_thread,
    cfg_for,
    generator_dict,
    metrics,
    tokenizer_dict,
    tokenizer_dir,
    tokenizer_run,
)

# trackers: [] keeps runs offline; accelerate warns that no tracker is installed
pytestmark = pytest.mark.filterwarnings("ignore:`log_with=.*no supported trackers:UserWarning")


@pytest.mark.parametrize("kind", ["tokenizer", "diffusion"])
def test_probe_trains_scores_and_appends_one_row(kind, tmp_path, tokenizer_dir, capsys):
    config = tmp_path / "preset.json"
    d = tokenizer_dict() if kind == "tokenizer" else generator_dict(kind, tokenizer_dir)
    config.write_text(json.dumps(d))
    args = [
        "probe",
        kind,
        "--config",
        str(config),
        "--steps",
        "2",
        "--per-category",
        "1",
        "--out",
        str(tmp_path / "probes"),
        "--sample-every",
        "1",
        "--set",
        "lr=1e-3",
        "--change",
        "my change",
    ]
    assert cli.main(args) == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (tmp_path / "probes" / "probes.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    row = rows[0]
    assert (row["change"], row["kind"], row["steps"], row["images"]) == ("my change", kind, 2, 2 * d["batch_size"])
    assert row["threads"] == torch.get_num_threads() and row["cpu"] and row["wall_min"] >= 0
    assert 0 <= row["accuracy"] <= 1 and 0 <= row["worst"] <= row["accuracy"] and 0 <= row["held_out"] <= 1
    if kind == "tokenizer":
        assert math.isfinite(row["psnr"]) and row["images_to_18db"] is None  # two steps stay on the plateau
    else:
        assert row["val_loss"] > 0 and math.isfinite(row["val_loss"])
    out = capsys.readouterr().out
    assert "change my change" in out and "accuracy" in out
    run = tmp_path / "probes" / f"{kind}-my-change"
    assert (run / "export" / "model.safetensors").is_file() and json.loads((run / "config.json").read_text())[
        "lr"
    ] == 1e-3
    assert (
        cli.main(
            args[:2]
            + ["--config", str(config), "--steps", "2"]
            + (["--set", "kind=ar"] if kind == "diffusion" else ["--set", "kind=diffusion"])
        )
        == 2
    )


def test_probe_and_train_take_an_ar_grouped_head_from_set(tmp_path, tokenizer_dir, capsys):
    """`--set model.bit_groups=2` (issue 26 lever 5): a probe trains, samples and scores an AR generator whose
    head draws a token's 16 bits as two 8-bit groups, and exports it as such; `binlat train` takes the key too, and
    refuses a grouping the tokenizer's bits do not allow (16 bits in 3 groups) with one line."""
    config = tmp_path / "preset.json"
    config.write_text(json.dumps(generator_dict("ar", tokenizer_dir)))
    args = [
        "probe",
        "ar",
        "--config",
        str(config),
        "--steps",
        "2",
        "--per-category",
        "1",
        "--out",
        str(tmp_path / "probes"),
        "--set",
        "model.bit_groups=2",
        "--change",
        "grouped head",
    ]
    assert cli.main(args) == 0, capsys.readouterr().err
    row = json.loads((tmp_path / "probes" / "probes.jsonl").read_text().splitlines()[0])
    assert 0 <= row["accuracy"] <= 1 and row["val_loss"] > 0 and math.isfinite(row["val_loss"])
    net = ARTransformer.from_pretrained(tmp_path / "probes" / "ar-grouped-head" / "export")
    assert net.config.bit_groups == 2 and net.head is not None and net.proj_out is None
    capsys.readouterr()
    run = tmp_path / "run"
    assert (
        cli.main(
            [
                "train",
                "ar",
                "--config",
                str(config),
                "--output",
                str(run),
                "--max-steps",
                "1",
                "--set",
                "model.bit_groups=2",
            ]
        )
        == 0
    ), capsys.readouterr().err
    assert json.loads((run / "config.json").read_text())["model"]["bit_groups"] == 2
    assert math.isfinite(metrics(run)[-1]["loss"])
    capsys.readouterr()
    assert (
        cli.main(
            [
                "train",
                "ar",
                "--config",
                str(config),
                "--output",
                str(tmp_path / "bad"),
                "--max-steps",
                "1",
                "--set",
                "model.bit_groups=3",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after a note on the short run's intervals
    assert last.startswith("binlat: error:") and "bit_groups (3) must divide num_bits (16)" in last
    assert "Traceback" not in err and not list_checkpoints(tmp_path / "bad")


@pytest.mark.parametrize("kind", ["diffusion", "ar"])
def test_validation_loss_is_a_function_of_the_weights(kind, tokenizer_dir):
    """The probes' early score: the same weights give the same number (randomness seeded per sample), other
    weights another, and a network that fits the held-out bits better scores lower."""
    from binlat.probe import validation_loss

    task = GeneratorTask(cfg_for(kind, tokenizer_dir), torch.device("cpu"))
    net = task.model
    first = validation_loss(task, net, count=8)
    assert first == validation_loss(task, net, count=8) and math.isfinite(first)
    with torch.no_grad():
        net.proj_out.bias.add_(3.0)  # every bit pushed toward 1: a worse fit than the untrained network
    assert validation_loss(task, net, count=8) > first
