"""What a training run reads (binlat.train): skipped samples are named on the console, then counted, also when a
DataLoader worker read them; the tokenizer's shapes stream renders held-out pairs and the generators' never does;
a run names its data and warns when a generator has no captions; precomputed bits bring their tokenizer."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from binlat import cli
from binlat.data.shapes import ShapesStream
from binlat.tokenizer import BinaryTokenizer
from binlat.train.engine import Trainer
from binlat.train.tasks import GeneratorTask, TokenizerTask
from train_support import (  # noqa: F401
    _detach_run_logs,
    _one_thread,
    cfg_for,
    generator_dict,
    make_cfg,
    tokenizer_dict,
    tokenizer_dir,
    tokenizer_run,
)

# trackers: [] keeps runs offline; accelerate warns that no tracker is installed
pytestmark = pytest.mark.filterwarnings("ignore:`log_with=.*no supported trackers:UserWarning")


# ---------------------------------------------------------------- skipped samples on the console


def _jpeg(seed: int, truncated: bool = False) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    data = buf.getvalue()
    return data[: len(data) // 2] if truncated else data


def _shard_with_bad_jpegs(path: Path, n: int, bad: set[int]) -> Path:
    with tarfile.open(path, "w") as tf:
        for i in range(n):
            for name, payload in ((f"s{i}.jpg", _jpeg(i, i in bad)), (f"s{i}.txt", b"a red circle")):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    return path


@pytest.mark.parametrize("workers", [0, 1])
def test_cli_train_names_a_skipped_sample_on_the_console(workers, tmp_path, capsys):
    """A truncated JPEG in a WebDataset shard is skipped; the console names it and the bar counts it, also when a
    DataLoader worker process read it."""
    shard = _shard_with_bad_jpegs(tmp_path / "shard-000.tar", 10, bad={1})
    config = tmp_path / "tok.json"
    config.write_text(json.dumps(tokenizer_dict(num_workers=workers)))
    run = tmp_path / "run"
    # 2 steps x 4 images take 8 of the 9 good samples: one pass, one skip
    assert (
        cli.main(
            [
                "train",
                "tokenizer",
                "--config",
                str(config),
                "--output",
                str(run),
                "--data",
                str(shard),
                "--max-steps",
                "2",
                "--batch-size",
                "4",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    named = [line for line in err.splitlines() if "skipping sample s1:" in line]
    assert len(named) == 1 and "truncated" in named[0] and str(shard) in named[0], err
    assert "skipped=1" in err  # the progress bar's running count
    assert "skipping sample s1:" in (run / "log.txt").read_text()  # and the run log still has it


def test_console_names_the_first_skips_then_counts_the_rest(tmp_path, capsys):
    """Seven skipped images in a folder (map-style reading): five named, then one line with the rest."""
    root = tmp_path / "images"
    root.mkdir()
    for i in range(16):
        (root / f"{i:02d}.jpg").write_bytes(_jpeg(i, truncated=i % 2 == 1 and i < 14))
    cfg = make_cfg(tokenizer_dict(data=str(root), max_steps=4, batch_size=4, save_every=4))
    Trainer(cfg, tmp_path / "run").train()  # 16 indices read: all 7 bad images skipped once
    err = capsys.readouterr().err
    named = [line for line in err.splitlines() if "skipping sample" in line]
    assert len(named) == 5 and all("truncated" in line for line in named), err
    assert "... and 2 more skipped samples (see log.txt)" in err
    assert "skipped=7" in err


def test_tokenizer_stream_renders_held_out_pairs_generator_stream_never(tokenizer_dir):
    """shapes spec: the tokenizer is a general image codec and sees every colour-shape pair; the generators'
    stream never renders or names a held-out composition."""
    from binlat.data.shapes import HELD_OUT

    def held_out_samples(task) -> int:
        data = task.dataset()
        pairs = [{(o["color"], o["shape"]) for o in data.sample(i)["scene"]["objects"]} for i in range(400)]
        return sum(bool(p & HELD_OUT) for p in pairs)

    cpu = torch.device("cpu")
    assert held_out_samples(TokenizerTask(make_cfg(tokenizer_dict()), cpu)) > 0
    assert held_out_samples(GeneratorTask(cfg_for("diffusion", tokenizer_dir), cpu)) == 0


def test_a_run_names_its_data_and_warns_when_a_generator_has_no_captions(tokenizer_dir, tmp_path, capsys):
    """Issue 27: before step 1 one line names the data (count, captions, their source, size); a folder of images
    without captions warns that the generator learns unconditional generation, unless --unconditional; sample grids
    are drawn from the run's own captions; a short --max-steps run fits the preset's intervals and says so."""
    folder = tmp_path / "images"
    folder.mkdir()
    stream = ShapesStream(size=64, seed=0)
    for i in range(8):
        sample = stream.sample(i)
        Image.fromarray(((sample["image"].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()).save(
            folder / f"{i}.png"
        )
    config = tmp_path / "diffusion.json"
    config.write_text(
        json.dumps(
            generator_dict("diffusion", tokenizer_dir, warmup_steps=50, log_every=50, sample_every=500, max_steps=500)
        )
    )
    argv = ["train", "diffusion", "--config", str(config), "--data", str(folder), "--max-steps", "2"]
    assert cli.main([*argv, "--output", str(tmp_path / "run")]) == 0
    out, err = capsys.readouterr()
    assert (
        f"data {folder}: 8 samples, 0 with captions; captions from same-named .txt files; images at 64 x 64 px" in out
    )
    assert "has a caption: the generator will learn unconditional generation only" in err and "--unconditional" in err
    assert (
        "--max-steps 2 is shorter than the preset's intervals: warmup_steps 50 -> 1, log_every 50 -> 1, "
        "sample_every 500 -> 2" in err
    )
    assert json.loads((tmp_path / "run" / "config.json").read_text())["warmup_steps"] == 1
    assert not (tmp_path / "run" / "samples").exists()  # no captions to prompt a sample grid with
    assert cli.main([*argv, "--unconditional", "--output", str(tmp_path / "run2"), "--set", "warmup_steps=50"]) == 0
    out, err = capsys.readouterr()
    assert "has a caption" not in err and "warmup_steps" not in err  # silenced; a --set interval stays
    (folder / "3.txt").write_text("a green square")
    (folder / "5.txt").write_text("two circles")
    task = GeneratorTask(make_cfg(generator_dict("diffusion", tokenizer_dir, data=str(folder))), torch.device("cpu"))
    assert task.own_prompts() == ["a green square", "two circles"]
    assert GeneratorTask(cfg_for("diffusion", tokenizer_dir), torch.device("cpu")).own_prompts()[0] == "a red circle"


def test_precomputed_bits_bring_their_tokenizer_and_a_failed_start_leaves_no_run_folder(
    tokenizer_dir, tmp_path, capsys, monkeypatch
):
    """Issue 27: after `precompute --tokenizer T`, `train diffusion --data BITS` trains on T whatever the preset
    names (run from another folder too); naming another tokenizer with --set is an error that names both fixes, and
    that failed start leaves no run folder."""
    bits = tmp_path / "bits"
    assert (
        cli.main(
            [
                "precompute",
                "--tokenizer",
                str(tokenizer_dir),
                "--data",
                "shapes",
                "--max-samples",
                "16",
                "--out",
                str(bits),
                "--no-progress",
            ]
        )
        == 0
    )
    config = tmp_path / "diffusion.json"
    config.write_text(json.dumps(generator_dict("diffusion", Path("default/tokenizer"))))
    monkeypatch.chdir(tmp_path)  # the index's tokenizer path must not depend on where precompute ran
    run = tmp_path / "run"
    assert (
        cli.main(
            [
                "train",
                "diffusion",
                "--config",
                str(config),
                "--data",
                str(bits),
                "--max-steps",
                "1",
                "--output",
                str(run),
            ]
        )
        == 0
    )
    assert json.loads((run / "config.json").read_text())["generator"]["tokenizer"] == str(tokenizer_dir.resolve())
    assert "the tokenizer" in capsys.readouterr().err
    other = tmp_path / "other-tokenizer"
    BinaryTokenizer(BinaryTokenizer.from_pretrained(tokenizer_dir).config).save_pretrained(other)
    failed = tmp_path / "failed"
    assert (
        cli.main(
            [
                "train",
                "diffusion",
                "--config",
                str(config),
                "--data",
                str(bits),
                "--max-steps",
                "1",
                "--set",
                f"generator.tokenizer={other}",
                "--output",
                str(failed),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "drop that --set" in err and f"precompute again with --tokenizer {other}" in err
    assert not failed.exists()
    config.write_text(json.dumps(generator_dict("diffusion", other)))  # the preset names it: the bits' own wins
    assert (
        cli.main(
            [
                "train",
                "diffusion",
                "--config",
                str(config),
                "--data",
                str(bits),
                "--max-steps",
                "1",
                "--output",
                str(tmp_path / "run2"),
            ]
        )
        == 0
    )
    api_run = tmp_path / "api-run"  # the same mismatch reached in the Trainer (Python API): the folder goes again
    trainer = Trainer(make_cfg(generator_dict("diffusion", other, data=str(bits))), api_run)
    with pytest.raises(ValueError, match="another tokenizer"):
        trainer.train()
    assert not api_run.exists()
