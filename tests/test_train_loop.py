"""The training loop (binlat.train): the three trainers run and write a complete run folder (config, log,
metrics, loss plot, checkpoints holding the model, its EMA and the optimiser); each can over-fit one batch, REPA
and shifted diffusion times included; the learning-rate schedule, the batches of a step and gradient accumulation,
which the discriminator follows; the tokenizer's switch from soft to sampled bits; bf16 autocast only where it is
native; non-finite losses skipped and counted, or stopping the run at its last good checkpoint."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from binlat.config import config_from_dict
from binlat.data.shapes import ShapesStream
from binlat.io import load_safetensors
from binlat.tokenizer import BinaryTokenizer
from binlat.train.checkpoints import export_run, list_checkpoints
from binlat.train.config import TokenizerTraining, TrainConfig
from binlat.train.data import StepBatches
from binlat.train.engine import Trainer
from binlat.train.schedule import lr_at
from binlat.train.tasks import TokenizerTask
from train_support import (  # noqa: F401
    CHECKPOINT_FILES,
    GENERATOR_MODEL,
    _detach_run_logs,
    _one_thread,
    assert_same_tensors,
    cfg_for,
    fail_at,
    make_cfg,
    metrics,
    state_of,
    step_dir,
    task_class,
    tokenizer_dict,
    tokenizer_dir,
    tokenizer_run,
)

# trackers: [] keeps runs offline; accelerate warns that no tracker is installed
pytestmark = pytest.mark.filterwarnings("ignore:`log_with=.*no supported trackers:UserWarning")


class EightSamples:
    """The same 8 shapes samples over and over: sample i is sample i % 8 of the stream."""

    def __init__(self, size: int):
        stream = ShapesStream(size=size, seed=0)
        self.items = [stream.sample(i) for i in range(8)]

    def sample(self, index: int) -> dict:
        return self.items[index % 8]


# ------------------------------------------------------------------------------------------------------------
# the three trainers run and write a complete run folder


@pytest.mark.parametrize("kind", ["tokenizer", "diffusion", "ar"])
def test_trainer_runs_and_writes_run_folder(kind, tmp_path, tokenizer_dir):
    if kind == "tokenizer":
        cfg = cfg_for(kind, tokenizer_dir, max_steps=6, save_every=2, log_every=2, keep_last=2)
    else:
        cfg = cfg_for(kind, tokenizer_dir, max_steps=4, save_every=1, log_every=1, keep_last=2)
    run = tmp_path / "run"
    trainer = Trainer(cfg, run)
    last = trainer.train()

    assert trainer.step == cfg.max_steps
    assert math.isfinite(last["loss"]) and last["lr"] == pytest.approx(cfg.lr)
    # config.json holds the exact run config
    assert make_cfg(json.loads((run / "config.json").read_text())) == cfg
    assert (run / "log.txt").is_file()
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(cfg.log_every, cfg.max_steps + 1, cfg.log_every))
    assert all(math.isfinite(r["loss"]) and r["images_per_s"] > 0 for r in rows)
    if kind == "tokenizer":
        assert {"rec_loss", "psnr", "grad_norm"} <= rows[0].keys()
    else:
        assert {"bit_accuracy", "grad_norm"} <= rows[0].keys()
    with Image.open(run / "loss.png") as im:
        assert im.format == "PNG" and im.size[0] > 100
    # keep_last: only the newest two checkpoints survive
    found = list_checkpoints(run)
    assert [p.name for p in found] == [f"step-{s:08d}" for s in (cfg.max_steps - cfg.save_every, cfg.max_steps)]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [p.name for p in found]
    for ckpt in found:
        assert {p.name for p in ckpt.iterdir()} == CHECKPOINT_FILES
    state = state_of(run, cfg.max_steps)
    assert state["step"] == cfg.max_steps and state["kind"] == kind
    assert state["skipped_steps"] == 0 and state["bad_steps"] == 0
    # the checkpoint holds the trained model (not the EMA) and an EMA that is a different average
    model_sd = load_safetensors(found[-1] / "model.safetensors")
    ema_sd = load_safetensors(found[-1] / "ema.safetensors")
    live = trainer.acc.unwrap_model(trainer.model).state_dict()
    assert_same_tensors(model_sd, {k: v.detach() for k, v in live.items()})
    assert model_sd.keys() == ema_sd.keys()
    assert all(torch.isfinite(v).all() for v in ema_sd.values())
    assert any(not torch.equal(model_sd[k], ema_sd[k]) for k in model_sd if model_sd[k].is_floating_point())
    optim = torch.load(found[-1] / "optimizer.pt", weights_only=True)
    assert all(int(s["step"]) == cfg.max_steps for s in optim["state"].values())


# ------------------------------------------------------------------------------------------------------------
# each trainer can over-fit one batch


@pytest.mark.parametrize(
    "kind,steps,lr,optimizer,model",
    [
        ("tokenizer", 15, 3e-3, "adamw", {}),
        ("diffusion", 15, 1e-2, "adamw", {}),
        ("ar", 15, 1e-2, "adamw", {}),
        ("diffusion", 15, 1e-2, "muon", {}),
        ("ar", 15, 1e-2, "adamw", {"bit_groups": 2}),
    ],
    ids=["tokenizer", "diffusion", "ar", "diffusion-muon", "ar-bit_groups-2"],
)
def test_overfits_one_batch(kind, steps, lr, optimizer, model, tmp_path, tokenizer_dir, monkeypatch):
    monkeypatch.setattr(task_class(kind), "dataset", lambda self: EightSamples(self.cfg.image_size))
    over = {"model": {**GENERATOR_MODEL, **model}} if model else {}
    cfg = cfg_for(
        kind,
        tokenizer_dir,
        max_steps=steps,
        lr=lr,
        warmup_steps=1,
        save_every=steps,
        log_every=1,
        optimizer=optimizer,
        **over,
    )
    Trainer(cfg, tmp_path / "run").train()
    losses = [r["loss"] for r in metrics(tmp_path / "run")]
    assert len(losses) == steps and all(map(math.isfinite, losses))
    first, final = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert final < 0.8 * first, losses


def test_repa_aligns_a_block_to_the_tokenizers_features(tmp_path, tokenizer_dir, monkeypatch):
    """generator.repa_weight: the network gains a head as wide as the tokenizer encoder's features, the loss pulls
    it towards them (the logged similarity rises), and the option is refused where it cannot work."""
    from binlat.tokenizer import BinaryTokenizer

    monkeypatch.setattr(task_class("diffusion"), "dataset", lambda self: EightSamples(self.cfg.image_size))
    cfg = cfg_for(
        "diffusion",
        tokenizer_dir,
        max_steps=15,
        lr=1e-2,
        warmup_steps=1,
        save_every=15,
        log_every=1,
        generator={"tokenizer": str(tokenizer_dir), "repa_weight": 1.0},
    )
    trainer = Trainer(cfg, tmp_path / "run")
    width = BinaryTokenizer.from_pretrained(tokenizer_dir).config.encoder_dim
    assert trainer.task.model.align_head[-1].out_features == width
    trainer.train()
    similarity = [r["align_similarity"] for r in metrics(tmp_path / "run")]
    assert len(similarity) == 15 and sum(similarity[-3:]) / 3 > sum(similarity[:3]) / 3 + 0.1, similarity
    with pytest.raises(ValueError, match="repa_weight is a diffusion option"):
        cfg_for("ar", tokenizer_dir, generator={"tokenizer": str(tokenizer_dir), "repa_weight": 1.0})


def test_time_logit_mean_shifts_the_diffusion_training_times(tmp_path, tokenizer_dir):
    """generator.time_logit_mean reaches the process that draws the training times (median sigmoid(mean)); it is
    refused for AR, which has no times, and out of range."""
    cfg = cfg_for("diffusion", tokenizer_dir, generator={"tokenizer": str(tokenizer_dir), "time_logit_mean": 1.0})
    trainer = Trainer(cfg, tmp_path / "run")
    process = trainer.task.process
    trainer.close()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        t = process.sample_t(20000)
    assert abs(t.median().item() - 0.7311) < 0.02  # sigmoid(1)
    with pytest.raises(ValueError, match="time_logit_mean is a diffusion option"):
        cfg_for("ar", tokenizer_dir, generator={"tokenizer": str(tokenizer_dir), "time_logit_mean": 1.0})
    with pytest.raises(ValueError, match="time_logit_mean"):
        cfg_for("diffusion", tokenizer_dir, generator={"tokenizer": str(tokenizer_dir), "time_logit_mean": 50.0})


# ------------------------------------------------------------------------------------------------------------
# the learning-rate schedule, the batches of a step, gradient accumulation


def test_lr_schedule_by_hand():
    cos = make_cfg(tokenizer_dict(lr=1e-3, warmup_steps=4, max_steps=14, lr_schedule="cosine", min_lr_ratio=0.1))
    assert [lr_at(cos, s) for s in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lr_at(cos, 4) == pytest.approx(1e-3)  # cosine starts at the peak
    assert lr_at(cos, 9) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # half-way
    assert lr_at(cos, 4 + 10 / 3) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.75))  # cos(pi/3) = 1/2
    assert lr_at(cos, 14) == pytest.approx(1e-4)  # the floor at max_steps ...
    assert lr_at(cos, 50) == pytest.approx(1e-4)  # ... and after it
    const = make_cfg(tokenizer_dict(lr=2e-4, warmup_steps=2, max_steps=10, lr_schedule="constant"))
    assert [lr_at(const, s) for s in (0, 1, 2, 5, 9, 100)] == pytest.approx([1e-4, 2e-4, 2e-4, 2e-4, 2e-4, 2e-4])
    no_warmup = make_cfg(tokenizer_dict(lr=1e-3, warmup_steps=0, max_steps=10, lr_schedule="cosine", min_lr_ratio=0.0))
    assert lr_at(no_warmup, 0) == pytest.approx(1e-3) and lr_at(no_warmup, 10) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("world,accum", [(2, 2), (4, 1), (1, 4), (2, 1)])
def test_step_batches_cover_the_global_batch(world, accum):
    g, start, stop = 8, 3, 7
    per = g // (world * accum)
    one = list(StepBatches(start, stop, g, 1, 0, 1))
    assert one == [list(range(s * g, (s + 1) * g)) for s in range(start, stop)]
    shares = [list(StepBatches(start, stop, per, world, r, accum)) for r in range(world)]
    for r in range(world):
        assert len(shares[r]) == len(StepBatches(start, stop, per, world, r, accum)) == (stop - start) * accum
        assert all(len(b) == per for b in shares[r])
    for i in range(stop - start):
        got = [x for r in range(world) for b in shares[r][i * accum : (i + 1) * accum] for x in b]
        assert sorted(got) == one[i]  # every step: exactly the single process's batch, no overlap


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    # float32 (as in the two-process test): compared to float tolerance
    cfgs = [make_cfg(tokenizer_dict(max_steps=3, save_every=3, grad_accum=a, mixed_precision="no")) for a in (1, 4)]
    for cfg, name in zip(cfgs, ("plain", "accum")):
        Trainer(cfg, tmp_path / name).train()
    assert_same_tensors(
        load_safetensors(step_dir(tmp_path / "plain", 3) / "model.safetensors"),
        load_safetensors(step_dir(tmp_path / "accum", 3) / "model.safetensors"),
        exact=False,
        atol=1e-5,
        rtol=1e-4,
    )
    with pytest.raises(ValueError, match="divisible"):
        Trainer(make_cfg(tokenizer_dict(batch_size=6, grad_accum=4)), tmp_path / "bad")


def test_the_discriminator_sees_every_micro_batch(tmp_path):
    """With grad_accum 2 the discriminator's update reads both micro-batches' reconstructions (each image once),
    not only the last one's (issue 28)."""
    cfg = config_from_dict(
        TrainConfig,
        tokenizer_dict(
            batch_size=8, grad_accum=2, max_steps=1, save_every=1, tokenizer={"gan_weight": 0.1, "gan_start": 0}
        ),
    )
    trainer = Trainer(cfg, tmp_path / "run")
    seen: list[torch.Tensor] = []
    disc = trainer.task.disc
    forward = disc.forward

    def spy(x):
        seen.append(x.detach().clone())
        return forward(x)

    disc.forward = spy
    original_after_step = trainer.task.after_step
    reads: list[int] = []

    def after_step(step, metrics):
        start = len(seen)
        original_after_step(step, metrics)
        reads.append(sum(len(x) for x in seen[start:]))

    trainer.task.after_step = after_step
    trainer.train()
    assert reads == [2 * 8]  # real and fake images of both 4-image micro-batches
    assert trainer.task.fakes == []


# ------------------------------------------------------------------------------------------------------------
# the tokenizer's soft latent, the mixed precision


def test_soft_latent_switches_on_psnr_or_at_the_step_limit():
    def task(**opts):
        soft = {**TokenizerTraining().__dict__, **opts}
        return TokenizerTask(make_cfg(tokenizer_dict(tokenizer=soft)), torch.device("cpu"))

    t = task(soft_until_psnr=20.0, soft_window=2)
    for step, psnr in enumerate([25.0, 14.0, 27.0]):  # a full window first averages >= 20 dB at step 2
        t.after_step(step, {"psnr": psnr})
        assert t.soft(step + 1) == (step < 2)
    assert t.bits_from == 3 and not t.soft(3)
    t = task(soft_until_psnr=99.0, soft_max_steps=2)
    t.after_step(0, {"psnr": 10.0})
    assert t.bits_from is None and t.soft(1)
    t.after_step(1, {"psnr": 10.0})
    assert t.bits_from == 2 and not t.soft(2) and t.soft(1)
    assert task().bits_from == 0 and not task().soft(0)  # soft start off: bits from the first step


def test_mixed_precision_auto_trains_bf16_only_where_it_is_native(tmp_path, tokenizer_dir, monkeypatch, capsys):
    """mixed_precision "auto" (the default): bf16 autocast where bf16 is native, float32 where it would be emulated;
    the run says which, before step 1. Decided here by BINLAT_ASSUME_BF16, so both branches run on any CPU."""
    from binlat.train.engine import precision_line, resolve_precision

    assert TrainConfig().mixed_precision == "auto"
    for native, chosen in (("1", "bf16"), ("0", "no")):
        monkeypatch.setenv("BINLAT_ASSUME_BF16", native)
        assert resolve_precision("auto") == chosen and resolve_precision("no") == "no"
        trainer = Trainer(cfg_for("diffusion", tokenizer_dir, max_steps=1, save_every=1), tmp_path / f"run{native}")
        assert trainer.precision == chosen and trainer.acc.mixed_precision == chosen
        trainer.train()
        out = capsys.readouterr().out
        assert precision_line("auto", chosen) in out
        assert ("bf16 autocast (native bf16 on this machine" in out) == (chosen == "bf16")
    with pytest.raises(ValueError, match="mixed_precision must be 'auto', 'no' or 'bf16'"):
        cfg_for("diffusion", tokenizer_dir, mixed_precision="fp16")


# ------------------------------------------------------------------------------------------------------------
# non-finite losses


def test_nonfinite_steps_are_skipped_and_counted(tmp_path, tokenizer_dir, monkeypatch):
    fail_at(monkeypatch, "tokenizer", {1, 4}, lambda loss, step: loss * float("nan"))
    cfg = make_cfg(tokenizer_dict(max_steps=6, save_every=3, log_every=1))
    run = tmp_path / "run"
    trainer = Trainer(cfg, run)
    trainer.train()
    assert trainer.step == 6 and trainer.skipped_steps == 2
    state = state_of(run, 6)
    assert state["skipped_steps"] == 2 and state["bad_steps"] == 0
    # steps 2 and 5 (computed at step numbers 1 and 4) were dropped: not logged, no optimiser update
    assert [r["step"] for r in metrics(run)] == [1, 3, 4, 6]
    optim = torch.load(step_dir(run, 6) / "optimizer.pt", weights_only=True)
    assert all(int(s["step"]) == 4 for s in optim["state"].values())
    for name in ("model.safetensors", "ema.safetensors"):
        assert all(torch.isfinite(v).all() for v in load_safetensors(step_dir(run, 6) / name).values())
    assert "non-finite loss, step skipped" in (run / "log.txt").read_text()


def test_persistent_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    fail_at(monkeypatch, "tokenizer", set(range(3, 100)), lambda loss, step: loss + float("inf"))
    cfg = make_cfg(tokenizer_dict(max_steps=20, save_every=3, log_every=1, max_bad_steps=3))
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="3 non-finite losses in a row"):
        Trainer(cfg, run).train()
    assert [p.name for p in list_checkpoints(run)] == ["step-00000003"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000003"]  # no half-written save
    state = state_of(run, 3)
    assert state["step"] == 3 and state["bad_steps"] == 0
    ema = load_safetensors(step_dir(run, 3) / "ema.safetensors")
    assert all(torch.isfinite(v).all() for v in ema.values())
    model = BinaryTokenizer.from_pretrained(export_run(run, tmp_path / "export"))
    assert_same_tensors(model.state_dict(), ema)
    monkeypatch.undo()
    resumed = Trainer(cfg, run, resume="latest")
    assert resumed.step == 3 and resumed.bad_steps == 0


def test_skipped_last_step_still_writes_final_checkpoint(tmp_path, monkeypatch):
    fail_at(monkeypatch, "tokenizer", {5}, lambda loss, step: loss * float("nan"))
    run = tmp_path / "run"
    trainer = Trainer(make_cfg(tokenizer_dict(max_steps=6, save_every=4, log_every=1)), run)
    trainer.train()
    assert trainer.step == 6
    assert list_checkpoints(run)[-1].name == "step-00000006"


def test_run_log_holds_only_its_own_run(tmp_path, monkeypatch):
    Trainer(make_cfg(tokenizer_dict(max_steps=1, save_every=1)), tmp_path / "first").train()
    fail_at(monkeypatch, "tokenizer", {0}, lambda loss, step: loss * float("nan"))
    Trainer(make_cfg(tokenizer_dict(max_steps=2, save_every=2)), tmp_path / "second").train()
    assert "non-finite" in (tmp_path / "second" / "log.txt").read_text()
    assert "non-finite" not in (tmp_path / "first" / "log.txt").read_text()


def test_role_contrast_gives_position_captions_their_swapped_roles_as_negatives(tmp_path, tokenizer_dir):
    """generator.role_contrast: the trainer gives each kept position caption of a batch its negative (roles
    swapped), rounded to float16 like the text of precomputed data; a run on position scenes logs the term and
    the gap at every step; a negative weight is refused."""
    position_only = "shapes:single=0,colors=0,two=0,counting=0,color_attr=0,position=1"
    cfg = cfg_for(
        "diffusion",
        tokenizer_dir,
        max_steps=2,
        data=position_only,
        generator={"tokenizer": str(tokenizer_dir), "role_contrast": 0.1},
    )
    trainer = Trainer(cfg, tmp_path / "run")
    task = trainer.task
    captions = ["a circle above a square", "a circle", "a triangle to the left of a square", "a square below a circle"]
    negatives = task._negatives({"caption": captions}, [False, False, False, True], half_precision=False)
    assert negatives.rows.tolist() == [0, 2]  # row 1 has no relation, row 3 was dropped for guidance
    expected = task.cached_text(["a square above a circle", "a square to the left of a triangle"])
    assert all(torch.equal(a, b) for a, b in zip(negatives.text.layers, expected.layers))
    assert torch.equal(negatives.text.mask, expected.mask)
    rounded = task._negatives({"caption": captions[:1]}, [False], half_precision=True)
    alone = task.cached_text(["a square above a circle"])
    assert all(torch.equal(a, b.half().float()) for a, b in zip(rounded.text.layers, alone.layers))
    trainer.train()
    logged = metrics(tmp_path / "run")
    assert len(logged) == 2 and all("contrast" in r and "role_gap" in r for r in logged), logged
    assert all(0 < r["contrast"] <= math.log(2) for r in logged)
    with pytest.raises(ValueError, match="role_contrast must be >= 0"):
        cfg_for("ar", tokenizer_dir, generator={"tokenizer": str(tokenizer_dir), "role_contrast": -1.0})
