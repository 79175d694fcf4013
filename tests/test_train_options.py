"""Training options beyond the plain loop: adversarial and perceptual losses, multi-resolution, encoder freezing,
bf16 autocast, gradient checkpointing, sample grids."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from binlat.config import config_from_dict
from binlat.io import load_safetensors
from binlat.tokenizer import BinaryTokenizer, TokenizerConfig
from binlat.tokenizer.losses import PerceptualLoss
from binlat.train.checkpoints import export_run
from binlat.train.config import TrainConfig
from binlat.train.engine import Trainer
from tiny_models import TINY_TOKENIZER_MODEL

pytestmark = pytest.mark.filterwarnings("ignore:`log_with=.*no supported trackers:UserWarning")
MODEL = TINY_TOKENIZER_MODEL


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(tmp_path, name, steps=3, **over):
    d = {
        "kind": "tokenizer",
        "model": dict(MODEL),
        "image_size": 64,
        "batch_size": 4,
        "max_steps": steps,
        "warmup_steps": 1,
        "save_every": steps,
        "log_every": 1,
        "trackers": [],
        **over,
    }
    trainer = Trainer(config_from_dict(TrainConfig, d), tmp_path / name)
    trainer.train()
    rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return trainer, rows


def test_adversarial_loss_trains_a_discriminator_and_checkpoints_it(tmp_path):
    trainer, rows = run(tmp_path, "gan", steps=3, tokenizer={"gan_weight": 0.5, "gan_start": 1})
    assert "gan_g_loss" not in rows[0] and all("gan_g_loss" in r for r in rows[1:])  # switched on at gan_start
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    ckpt = tmp_path / "gan" / "checkpoints" / "step-00000003"
    disc = load_safetensors(ckpt / "disc.safetensors")
    initial = type(trainer.task.disc)(3).state_dict()
    assert (ckpt / "disc_optimizer.pt").is_file()
    assert any(not torch.equal(disc[k], initial[k]) for k in disc if disc[k].dtype.is_floating_point)


def test_perceptual_loss_uses_local_weights_or_logs_that_it_is_off(tmp_path, caplog, random_vgg16):
    with caplog.at_level(logging.WARNING, logger="binlat"):
        run(tmp_path, "off", steps=1, tokenizer={"perceptual_weight": 1.0})
    assert "perceptual loss off" in caplog.text
    # A stand-in VGG16 (random weights under torchvision's names) switches it on; identical images score 0.
    path = random_vgg16
    loss = PerceptualLoss(path)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert loss(x, x).item() == 0.0 and loss(x, -x).item() > 0
    trainer, rows = run(tmp_path, "on", steps=1, tokenizer={"perceptual_weight": 1.0, "perceptual_weights": str(path)})
    assert trainer.task.perceptual is not None and torch.isfinite(torch.tensor(rows[0]["loss"]))


def test_multiresolution_batches_use_sizes_from_the_list(tmp_path, monkeypatch):
    from binlat.train import tasks

    seen = []
    original = BinaryTokenizer.forward

    def spy(self, images, *a, **k):
        seen.append(images.shape[-1])
        return original(self, images, *a, **k)

    monkeypatch.setattr(BinaryTokenizer, "forward", spy)
    run(tmp_path, "multi", steps=8, tokenizer={"multires_sizes": [32, 64]})
    assert set(seen) == {32, 64}
    assert tasks  # the task picks the size per step, the same on every process


def test_frozen_encoder_stage_only_changes_the_decoder(tmp_path):
    torch.manual_seed(1)
    start = BinaryTokenizer(TokenizerConfig(**MODEL, image_size=64))
    start.save_pretrained(tmp_path / "start")
    trainer, _ = run(
        tmp_path, "frozen", steps=2, lr=1e-2, tokenizer={"freeze_encoder": True, "init_from": str(tmp_path / "start")}
    )
    end = trainer.acc.unwrap_model(trainer.model).state_dict()
    before = start.state_dict()
    for key in before:
        same = torch.equal(before[key], end[key])
        if key.startswith("encoder.") or key.startswith("quantizer.to_logits"):
            assert same, key
    assert any(not torch.equal(before[k], end[k]) for k in before if k.startswith("decoder."))


def test_bf16_autocast_and_gradient_checkpointing_run(tmp_path, monkeypatch):
    monkeypatch.setenv("BINLAT_ASSUME_BF16", "1")  # runs emulated where the CPU lacks bf16 (tiny model: seconds)
    _, rows = run(tmp_path, "bf16", steps=2, mixed_precision="bf16", grad_checkpointing=True)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    export_run(tmp_path / "bf16", tmp_path / "exported")
    assert BinaryTokenizer.from_pretrained(tmp_path / "exported").quantizer.codebook.dtype == torch.float32


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(2)
    model = BinaryTokenizer(TokenizerConfig(**MODEL, image_size=64)).train()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    noise = torch.rand(2, 16, 16)

    def grads():
        model.zero_grad()
        model(x, noise=noise).reconstruction.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.enable_gradient_checkpointing()
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)


def test_sample_grids_and_the_tokenizer_ceiling_are_written(tmp_path):
    _, rows = run(tmp_path, "grid", steps=2, sample_every=2)
    assert (tmp_path / "grid" / "samples" / "step-00000002.png").is_file()
    ceiling = [r for r in rows if "eval_psnr" in r]
    assert [r["step"] for r in ceiling] == [2] and 0 < ceiling[0]["eval_psnr"] < 60


def test_generator_runs_report_judged_shapes_accuracy(tmp_path):
    _, rows = run(tmp_path, "tok", steps=1)
    export_run(tmp_path / "tok", tmp_path / "tokenizer")
    d = {
        "kind": "diffusion",
        "model": {"num_layers": 1, "num_heads": 2, "head_dim": 16},
        "image_size": 64,
        "batch_size": 4,
        "max_steps": 1,
        "warmup_steps": 1,
        "save_every": 1,
        "log_every": 1,
        "sample_every": 1,
        "trackers": [],
        "generator": {"tokenizer": str(tmp_path / "tokenizer"), "sample_steps": 2},
    }
    Trainer(config_from_dict(TrainConfig, d), tmp_path / "diff").train()
    rows = [json.loads(x) for x in (tmp_path / "diff" / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in rows if "eval_shapes_accuracy" in r]
    assert len(scored) == 1 and 0.0 <= scored[0]["eval_shapes_accuracy"] <= 1.0
    assert {f"eval_{c}" for c in ("single", "colors", "two", "counting", "position", "color_attr")} <= scored[0].keys()


def test_gradient_l1_sees_edges_not_offsets():
    from binlat.tokenizer.losses import gradient_l1

    image = torch.zeros(1, 3, 8, 8)
    image[..., 2:6, 2:6] = 1.0
    assert gradient_l1(image, image) == 0
    assert gradient_l1(image + 0.5, image) == 0  # a brightness offset has no edges
    moved = torch.roll(image, 1, dims=-1)
    assert gradient_l1(moved, image) > 0
    blurred = torch.nn.functional.avg_pool2d(image, 3, 1, 1)
    assert gradient_l1(blurred, image) > 0


def test_self_conditioned_diffusion_and_context_flip_ar_train_export_and_generate(tmp_path):
    from binlat.generators import ARTransformer, DiffusionTransformer
    from binlat.pipeline import Pipeline
    from binlat.text import TextEncoder

    run(tmp_path, "tok", steps=1)
    export_run(tmp_path / "tok", tmp_path / "tokenizer")
    base = {
        "image_size": 64,
        "batch_size": 4,
        "max_steps": 2,
        "warmup_steps": 1,
        "save_every": 2,
        "log_every": 1,
        "trackers": [],
        "lr": 1e-2,
    }
    generator = {"tokenizer": str(tmp_path / "tokenizer"), "prediction": "x0"}
    small = {"num_layers": 1, "num_heads": 2, "head_dim": 16}
    diff = {**base, "kind": "diffusion", "model": {**small, "self_condition": True}, "generator": generator}
    Trainer(config_from_dict(TrainConfig, diff), tmp_path / "diff").train()
    ar = {**base, "kind": "ar", "model": small, "generator": {**generator, "context_flip": 0.1}}
    Trainer(config_from_dict(TrainConfig, ar), tmp_path / "ar").train()
    net = DiffusionTransformer.from_pretrained(export_run(tmp_path / "diff", tmp_path / "diff-export"))
    assert net.config.self_condition and net.estimate_embed.weight.abs().sum() > 0  # trained away from zero
    pipe = Pipeline(
        BinaryTokenizer.from_pretrained(tmp_path / "tokenizer"),
        TextEncoder("all-MiniLM-L6-v2"),
        diffusion=net,
        ar=ARTransformer.from_pretrained(export_run(tmp_path / "ar", tmp_path / "ar-x")),
    )
    out = pipe(["a red circle"], num_steps=3, guidance_scale=1.0, seed=0, progress=False, return_bits=True)
    assert out.bits.shape == (1, 16, 16)
    assert pipe(["two squares"], kind="ar", seed=0, progress=False, return_bits=True).bits.shape == (1, 16, 16)
    for bad, message in (
        ({"generator": {**generator, "context_flip": 0.5}, "kind": "ar", "model": small}, "context_flip"),
        ({"generator": generator, "kind": "ar", "model": {**small, "self_condition": True}}, "self_condition"),
    ):
        with pytest.raises(ValueError, match=message):
            Trainer(config_from_dict(TrainConfig, {**base, **bad}), tmp_path / "bad").train()


def test_compiled_training_forward_matches_eager_and_saves_plain_weights(tmp_path):
    run(tmp_path, "tok", steps=1)
    export_run(tmp_path / "tok", tmp_path / "tokenizer")
    d = {
        "kind": "diffusion",
        "model": {"num_layers": 1, "num_heads": 2, "head_dim": 16},
        "image_size": 64,
        "batch_size": 4,
        "max_steps": 3,
        "warmup_steps": 1,
        "save_every": 3,
        "log_every": 1,
        "trackers": [],
        "generator": {"tokenizer": str(tmp_path / "tokenizer"), "prediction": "x0"},
        "mixed_precision": "no",  # compared to float tolerance
    }
    losses = {}
    for compiled in (False, True):
        name = f"diff-{compiled}"
        Trainer(config_from_dict(TrainConfig, {**d, "compile": compiled}), tmp_path / name).train()
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses[compiled] = [r["loss"] for r in rows if "loss" in r]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)  # the same steps, fused kernels' rounding apart
    eager = load_safetensors(tmp_path / "diff-False" / "checkpoints" / "step-00000003" / "model.safetensors")
    compiled = load_safetensors(tmp_path / "diff-True" / "checkpoints" / "step-00000003" / "model.safetensors")
    assert eager.keys() == compiled.keys()
    assert all(torch.allclose(eager[k], compiled[k], atol=1e-4) for k in eager)
