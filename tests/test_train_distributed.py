"""Training in several processes (binlat.train): two processes (accelerate launch, gloo on CPU) take the steps of
one process with the same global batch and log the same losses; a launch that is not one world, or that asks for
FSDP or DeepSpeed without an accelerator, stops with one line before anything trains; the last call frees the
model before the process ends."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from binlat import cli
from binlat.io import load_safetensors
from binlat.train.checkpoints import list_checkpoints
from binlat.train.engine import Trainer
from train_support import (  # noqa: F401
    CHECKPOINT_FILES,
    _detach_run_logs,
    _one_thread,
    assert_same_tensors,
    make_cfg,
    metrics,
    state_of,
    step_dir,
    tokenizer_dict,
)

# trackers: [] keeps runs offline; accelerate warns that no tracker is installed
pytestmark = pytest.mark.filterwarnings("ignore:`log_with=.*no supported trackers:UserWarning")


# ------------------------------------------------------------------------------------------------------------
# two processes (accelerate launch, gloo on CPU) take the steps of one process with the same global batch


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
# launches that cannot train as one world stop before they start; the end frees the model


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
