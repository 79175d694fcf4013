"""Resuming a training run (binlat.train): an interrupted run, resumed, ends bit for bit where an uninterrupted one
does (weights, EMA, optimiser moments, logged losses), the tokenizer's soft-latent switch included; a checkpoint
written on other numerics warns; an explicit checkpoint resumes anywhere, and one of another kind is refused."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from binlat.io import load_safetensors
from binlat.train.checkpoints import list_checkpoints
from binlat.train.config import TokenizerTraining, TrainConfig
from binlat.train.engine import Trainer
from train_support import (  # noqa: F401
    _detach_run_logs,
    _one_thread,
    assert_same_tensors,
    cfg_for,
    fail_at,
    make_cfg,
    metrics,
    state_of,
    step_dir,
    tokenizer_dict,
    tokenizer_dir,
    tokenizer_run,
)

# trackers: [] keeps runs offline; accelerate warns that no tracker is installed
pytestmark = pytest.mark.filterwarnings("ignore:`log_with=.*no supported trackers:UserWarning")


# ------------------------------------------------------------------------------------------------------------
# an interrupted run, resumed, ends bit for bit where an uninterrupted one does


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
