"""The training engine (binlat.train): the three trainers, checkpoints, resume, multi-process equivalence,
non-finite losses, the learning-rate schedule, the data order, export and the `binlat train/export` CLI."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from binlat import cli
from binlat.config import config_from_dict, config_to_dict
from binlat.data.shapes import ShapesStream
from binlat.generators import ARTransformer, DiffusionTransformer
from binlat.io import load_safetensors
from binlat.tokenizer import BinaryTokenizer
from binlat.train.checkpoints import export_run, list_checkpoints
from binlat.train.config import TokenizerTraining, TrainConfig
from binlat.train.data import StepBatches
from binlat.train.engine import Trainer
from binlat.train.schedule import lr_at
from binlat.train.tasks import GeneratorTask, TokenizerTask

TOKENIZER_MODEL = {
    "patch_size": 8,
    "num_tokens": 16,
    "num_bits": 16,
    "encoder_layers": 1,
    "encoder_heads": 2,
    "encoder_head_dim": 16,
    "decoder_layers": 1,
    "decoder_heads": 2,
    "decoder_head_dim": 16,
    "rope_axes_dims": [4, 6, 6],
    "downsample_after": [0],
    "upsample_after": [0],
}
GENERATOR_MODEL = {"num_layers": 2, "num_heads": 2, "head_dim": 16}
# trackers: [] keeps runs offline; accelerate warns that no tracker is installed
pytestmark = pytest.mark.filterwarnings("ignore:`log_with=.*no supported trackers:UserWarning")
CHECKPOINT_FILES = {"model.safetensors", "ema.safetensors", "optimizer.pt", "state.json"}


def tokenizer_dict(**over) -> dict:
    d = {
        "kind": "tokenizer",
        "model": dict(TOKENIZER_MODEL),
        "image_size": 64,
        "batch_size": 8,
        "max_steps": 6,
        "warmup_steps": 2,
        "save_every": 3,
        "log_every": 2,
        "trackers": [],
    }
    return {**d, **over}


def generator_dict(kind: str, tokenizer_dir: Path, **over) -> dict:
    d = {
        "kind": kind,
        "model": dict(GENERATOR_MODEL),
        "image_size": 64,
        "batch_size": 8,
        "max_steps": 4,
        "warmup_steps": 1,
        "save_every": 2,
        "log_every": 1,
        "trackers": [],
        "generator": {"tokenizer": str(tokenizer_dir), "sample_steps": 3},
    }
    return {**d, **over}


def make_cfg(d: dict) -> TrainConfig:
    return config_from_dict(TrainConfig, d)


def cfg_for(kind: str, tokenizer_dir: Path, **over) -> TrainConfig:
    return make_cfg(tokenizer_dict(**over) if kind == "tokenizer" else generator_dict(kind, tokenizer_dir, **over))


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:08d}"


def state_of(run: Path, step: int) -> dict:
    return json.loads((step_dir(run, step) / "state.json").read_text())


def assert_same_tensors(a: dict, b: dict, exact: bool = True, **tol) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], msg=k, **tol)


def task_class(kind: str):
    return TokenizerTask if kind == "tokenizer" else GeneratorTask


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These models are tiny: one intra-op thread is faster than two and steadier on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _detach_run_logs():
    """Trainer attaches a log.txt handler to the `binlat` logger; detach what a test attached once it ends."""
    root = logging.getLogger("binlat")
    before, level = list(root.handlers), root.level
    yield
    for h in [h for h in root.handlers if h not in before]:
        root.removeHandler(h)
        h.close()
    root.setLevel(level)


@pytest.fixture(scope="module")
def tokenizer_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("tokenizer-run") / "run"
    Trainer(make_cfg(tokenizer_dict()), run).train()
    for h in [
        h
        for h in logging.getLogger("binlat").handlers
        if isinstance(h, logging.FileHandler) and Path(h.baseFilename).is_relative_to(run)
    ]:
        logging.getLogger("binlat").removeHandler(h)
        h.close()
    return run


@pytest.fixture(scope="module")
def tokenizer_dir(tokenizer_run, tmp_path_factory) -> Path:
    return export_run(tokenizer_run, tmp_path_factory.mktemp("tokenizer-export") / "tokenizer")


class EightSamples:
    """The same 8 shapes samples over and over: sample i is sample i % 8 of the stream."""

    def __init__(self, size: int):
        stream = ShapesStream(size=size, seed=0)
        self.items = [stream.sample(i) for i in range(8)]

    def sample(self, index: int) -> dict:
        return self.items[index % 8]


def fail_at(monkeypatch, kind: str, steps, make):
    """Wrap the task loss: at the given step numbers, replace the result with make(loss, step)."""
    cls = task_class(kind)
    original = cls.loss

    def loss(self, model, batch, step, gens):
        value, extra = original(self, model, batch, step, gens)
        return (make(value, step), extra) if step in steps else (value, extra)

    monkeypatch.setattr(cls, "loss", loss)


# ------------------------------------------------------------------------------------------------------------
# 1. the three trainers run and write a complete run folder


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
# 2. each trainer can over-fit one batch


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
# 3. an interrupted run, resumed, ends bit for bit where an uninterrupted one does


class Interrupted(Exception):
    pass


def interrupt(loss, step):
    raise Interrupted(step)


@pytest.mark.parametrize("kind,optimizer", [("tokenizer", "adamw"), ("diffusion", "adamw"), ("ar", "muon")])
def test_interrupt_and_resume_is_bitwise_identical(kind, optimizer, tmp_path, tokenizer_dir, monkeypatch):
    over = dict(max_steps=6, save_every=3, log_every=1, warmup_steps=2, lr_schedule="cosine", optimizer=optimizer)
    check_exact_resume(cfg_for(kind, tokenizer_dir, **over), kind, tmp_path, monkeypatch)


def test_resume_keeps_the_soft_latent_switch(tmp_path, monkeypatch):
    """The switch from probabilities to sampled bits depends on the PSNRs of recent steps: a resumed run must
    switch at the same step, with the window it had (here it switches at step 3, the checkpoint's)."""
    soft = {**TokenizerTraining().__dict__, "soft_until_psnr": 1.0, "soft_window": 3, "bit_reg_weight": 0.0}
    cfg = make_cfg(tokenizer_dict(max_steps=6, save_every=3, log_every=1, warmup_steps=2, tokenizer=soft))
    runs = check_exact_resume(cfg, "tokenizer", tmp_path, monkeypatch)
    assert state_of(runs[0], 3)["task"]["bits_from"] == 3
    assert [r["soft_latent"] for r in metrics(runs[0]) if "soft_latent" in r] == [1, 1, 1, 0, 0, 0]


def test_end_distributed_frees_the_model_before_the_process_ends(tmp_path):
    """`binlat train`'s last call frees the model even inside a reference cycle (as DDP and FSDP hooks make them),
    so nothing holding a process group is left for interpreter shutdown; then the trainer is spent."""
    import weakref

    trainer = Trainer(make_cfg(tokenizer_dict(max_steps=1, save_every=1)), tmp_path / "run")
    trainer.train()
    model = weakref.ref(trainer.model)
    trainer.model.cycle = [trainer.model]  # only the garbage collector frees this
    trainer.end_distributed()
    assert model() is None and trainer.model is None and trainer.optimizer is None
    assert not torch.distributed.is_initialized()


def test_resume_on_other_numerics_warns(tmp_path, caplog):
    run = tmp_path / "run"
    Trainer(make_cfg(tokenizer_dict(max_steps=2, save_every=2)), run).train()
    path = step_dir(run, 2) / "state.json"
    state = json.loads(path.read_text())
    assert state["numerics"] == {
        "cpu": state["numerics"]["cpu"],
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    with caplog.at_level(logging.WARNING, logger="binlat"):
        Trainer(make_cfg(tokenizer_dict(max_steps=2, save_every=2)), run, resume="latest").close()
    assert "other numerics" not in caplog.text
    state["numerics"]["threads"] += 1
    path.write_text(json.dumps(state))
    with caplog.at_level(logging.WARNING, logger="binlat"):
        Trainer(make_cfg(tokenizer_dict(max_steps=2, save_every=2)), run, resume="latest").close()
    assert "not end bit for bit" in caplog.text


def check_exact_resume(cfg: TrainConfig, kind: str, tmp_path: Path, monkeypatch) -> tuple[Path, Path]:
    """Run A goes through; run B dies in step 3 and resumes: every weight, moment and logged loss must match."""
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    Trainer(cfg, run_a).train()

    with monkeypatch.context() as m:  # run B dies while computing step 3, after checkpoint step 3 was written
        fail_at(m, kind, {3}, interrupt)
        with pytest.raises(Interrupted):
            Trainer(cfg, run_b).train()
    assert [p.name for p in list_checkpoints(run_b)] == ["step-00000003"]

    resumed = Trainer(cfg, run_b, resume="latest")
    assert resumed.step == 3
    resumed.train()
    assert resumed.step == 6
    for name in ("model.safetensors", "ema.safetensors"):
        assert_same_tensors(load_safetensors(step_dir(run_a, 6) / name), load_safetensors(step_dir(run_b, 6) / name))
    opt_a = torch.load(step_dir(run_a, 6) / "optimizer.pt", weights_only=True)
    opt_b = torch.load(step_dir(run_b, 6) / "optimizer.pt", weights_only=True)
    for k in opt_a["state"]:
        assert_same_tensors(opt_a["state"][k], opt_b["state"][k])
    # the logged losses of the resumed steps are the uninterrupted run's, exactly
    assert [(r["step"], r["loss"], r["lr"]) for r in metrics(run_a)] == [
        (r["step"], r["loss"], r["lr"]) for r in metrics(run_b)
    ]
    return run_a, run_b


def test_resume_from_explicit_checkpoint_and_kind_check(tmp_path, tokenizer_dir):
    run = tmp_path / "run"
    Trainer(make_cfg(tokenizer_dict(max_steps=3, save_every=3)), run).train()
    t = Trainer(
        make_cfg(tokenizer_dict(max_steps=3, save_every=3)), tmp_path / "elsewhere", resume=str(step_dir(run, 3))
    )
    assert t.step == 3
    with pytest.raises(ValueError, match="tokenizer checkpoint, not diffusion"):
        Trainer(cfg_for("diffusion", tokenizer_dir), tmp_path / "x", resume=str(step_dir(run, 3)))
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        Trainer(make_cfg(tokenizer_dict()), tmp_path / "x", resume=str(run))


# ------------------------------------------------------------------------------------------------------------
# 4. two processes (accelerate launch, gloo on CPU) take the steps of one process with the same global batch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LAUNCHER = """\
# `binlat train` as accelerate launches it, plus a probe: each process records what accelerate made of it.
import json, os, sys
import torch.distributed as dist
from binlat import cli
from binlat.train import engine

train = engine.Trainer.train


def probed_train(self):
    info = {"rank": self.acc.process_index, "world": self.acc.num_processes,
            "distributed": str(self.acc.distributed_type), "per_process": self.per_process,
            "backend": dist.get_backend() if dist.is_initialized() else None}
    with open(os.path.join(os.environ["PROBE_DIR"], f"rank-{info['rank']}.json"), "w") as f:
        json.dump(info, f)
    return train(self)


engine.Trainer.train = probed_train
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    """The same config trained by `accelerate launch` with 2 CPU processes and by one process.

    Note: with accelerate 1.15 `accelerate launch --cpu --num_processes 2` starts ONE process (the simple
    launcher; several CPU processes need an MPI hostfile), so the 2-process run uses the torchrun launcher
    (--multi_gpu) with ACCELERATE_USE_CPU=true, which makes accelerate use MULTI_CPU with the gloo backend."""
    root = tmp_path_factory.mktemp("ddp")
    config = root / "tokenizer.json"
    # float32: the runs are compared to float tolerance (bf16 autocast, the default where native, rounds the split
    # batch differently from the whole one)
    over = dict(max_steps=4, save_every=4, log_every=1, warmup_steps=2, mixed_precision="no")
    config.write_text(json.dumps(tokenizer_dict(**over)))
    launcher = root / "launch_binlat.py"
    launcher.write_text(LAUNCHER)
    probes = root / "probes"
    probes.mkdir()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "ACCELERATE_USE_CPU": "true",
        "PROBE_DIR": str(probes),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(cli.__file__).parents[1]), os.environ.get("PYTHONPATH")])),
    }
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        str(launcher),
        "train",
        "tokenizer",
        "--config",
        str(config),
        "--output",
        str(root / "ddp"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    infos = sorted((json.loads(p.read_text()) for p in probes.glob("rank-*.json")), key=lambda i: i["rank"])
    assert [i["rank"] for i in infos] == [0, 1], infos
    assert all(i["world"] == 2 and i["per_process"] == 4 and i["backend"] == "gloo" for i in infos), infos
    assert all(i["distributed"].endswith("MULTI_CPU") for i in infos), infos
    assert cli.main(["train", "tokenizer", "--config", str(config), "--output", str(root / "single")]) == 0
    return root / "single", root / "ddp"


def test_two_processes_take_the_same_steps_as_one(two_process_runs):
    single, ddp = two_process_runs
    for name in ("model.safetensors", "ema.safetensors"):
        assert_same_tensors(
            load_safetensors(step_dir(single, 4) / name),
            load_safetensors(step_dir(ddp, 4) / name),
            exact=False,
            atol=1e-5,
            rtol=1e-4,
        )
    one, two = metrics(single), metrics(ddp)
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):  # the (all-reduced) gradient norm and the lr are the same every step
        assert a["lr"] == b["lr"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4, abs=1e-5)
    assert state_of(ddp, 4)["step"] == 4 and {p.name for p in step_dir(ddp, 4).iterdir()} == CHECKPOINT_FILES


def test_two_processes_log_the_same_losses_as_one(two_process_runs):
    single, ddp = two_process_runs
    for a, b in zip(metrics(single), metrics(ddp)):
        for key in ("loss", "rec_loss"):
            assert abs(a[key] - b[key]) < 1e-4, (a["step"], key, a[key], b[key])


# ------------------------------------------------------------------------------------------------------------
# 5. non-finite losses


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


# ------------------------------------------------------------------------------------------------------------
# 6. schedule, data order, export, CLI


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


def test_a_launch_that_is_not_one_world_never_trains(tmp_path, monkeypatch, capsys):
    """A launcher that started 2 processes which accelerate sees as worlds of 1 (an FSDP config on CPUs) would
    train two copies into one folder: each process stops with one line instead."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = tmp_path / "tok.json"
    config.write_text(json.dumps(tokenizer_dict()))
    run = tmp_path / "run"
    assert cli.main(["train", "tokenizer", "--config", str(config), "--output", str(run)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "launcher started 2 processes but accelerate sees a world of 1" in lines[0]
    assert not list_checkpoints(run)


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


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED"])
def test_a_sharded_launch_without_an_accelerator_stops_before_prepare(kind, tmp_path, monkeypatch, capsys):
    """The condition, not a message: a launch that asks for FSDP or DeepSpeed (as accelerate's launcher says it, in
    ACCELERATE_USE_*) on a machine with no accelerator stops with one line naming the CPU DDP config, before any
    model is built or any file written; the same check reads an Accelerator's own distributed type and device."""
    from accelerate.utils import DistributedType

    from binlat.train import engine

    monkeypatch.setenv(f"ACCELERATE_USE_{kind}", "true")
    monkeypatch.setattr(engine.torch.accelerator, "is_available", lambda: False)
    built = []
    monkeypatch.setattr(engine.Accelerator, "prepare", lambda *a, **k: built.append(a))
    config = tmp_path / "tok.json"
    config.write_text(json.dumps(tokenizer_dict()))
    run = tmp_path / "run"
    assert cli.main(["train", "tokenizer", "--config", str(config), "--output", str(run)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "needs GPUs" in lines[0] and "configs/accelerate/cpu-ddp-2proc.yaml" in lines[0]
    assert not built and not run.exists()
    monkeypatch.delenv(f"ACCELERATE_USE_{kind}")
    with pytest.raises(ValueError, match="cpu-ddp-2proc"):
        engine.check_sharding_has_an_accelerator(getattr(DistributedType, kind), torch.device("cpu"))
    engine.check_sharding_has_an_accelerator(DistributedType.MULTI_CPU, torch.device("cpu"))  # DDP on CPUs is fine
    engine.check_sharding_has_an_accelerator(getattr(DistributedType, kind), torch.device("meta"))  # stands for a GPU


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


def test_the_decoder_stage_preset_asks_for_the_tokenizer_it_starts_from(tmp_path, monkeypatch):
    """tokenizer/shapes-64-decoder freezes a trained encoder; a preset cannot know where the user's is, so it names
    none, and a run without --set tokenizer.init_from stops before making a run folder, naming the key."""
    from binlat.config import resolve_config

    cfg = make_cfg(json.loads(resolve_config("tokenizer/shapes-64-decoder").read_text()))
    assert cfg.tokenizer.freeze_encoder and cfg.tokenizer.init_from is None
    with pytest.raises(ValueError, match=r"freeze_encoder trains only the decoder.*--set tokenizer.init_from=DIR"):
        Trainer(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
