"""binlat's part of FSDP, on two gloo processes: full-state-dict saving (gathering DTensor shards), resume into a
sharded model, and export, with PyTorch's FSDP2 `fully_shard`.

accelerate turns an FSDP launch config into plain multi-CPU DDP when there is no GPU (ACCELERATE_USE_CPU), so it
cannot shard here. Each worker therefore runs binlat's Trainer with accelerate in MULTI_CPU mode and has
`Accelerator.prepare` shard the model with `fully_shard` (every block, then the root), as accelerate's FSDP2
plugin does on GPUs; everything after that (steps, EMA, save, resume) is binlat's own code. The sharded run must
end where a one-process run with the same global batch ends (FSDP averages gradients as DDP does).

The DeepSpeed ZeRO-2 config is only checked against accelerate's schema (test_launch_configs_match_accelerates_schema):
deepspeed is not a binlat dependency, and with it installed accelerate 1.16 on a CPU either runs the config as DDP
(ACCELERATE_USE_CPU) or gives each launched process a world of one, which binlat's world-size check stops (README,
"Training")."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from binlat.config import config_from_dict
from binlat.io import load_safetensors
from binlat.train.checkpoints import export_run, list_checkpoints
from binlat.train.config import TrainConfig

pytestmark = pytest.mark.filterwarnings("ignore:`log_with=.*no supported trackers:UserWarning")
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
TOKENIZER = {
    "patch_size": 8,
    "num_tokens": 16,
    "num_bits": 16,
    "encoder_layers": 2,
    "encoder_heads": 2,
    "encoder_head_dim": 16,
    "decoder_layers": 2,
    "decoder_heads": 2,
    "decoder_head_dim": 16,
    "rope_axes_dims": [4, 6, 6],
    "downsample_after": [],
    "upsample_after": [],
}


def run_config(max_steps: int) -> dict:
    return {
        "kind": "tokenizer",
        "model": dict(TOKENIZER),
        "image_size": 32,
        "batch_size": 4,
        "max_steps": max_steps,
        "warmup_steps": 1,
        "save_every": 2,
        "log_every": 1,
        "trackers": [],
        "sample_every": 0,
        "num_workers": 0,
        "mixed_precision": "no",  # compared across process counts to float tolerance
    }


HANG_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shard_on_prepare(self, model, optimizer):
    """Accelerator.prepare as accelerate's FSDP2 plugin would do it: fully_shard each block, then the root, and
    point the optimizer at the sharded (DTensor) parameters."""
    from torch.distributed.fsdp import fully_shard

    for name in ("encoder", "decoder"):
        for block in getattr(model, name).blocks:
            fully_shard(block)
    fully_shard(model)
    optimizer.param_groups[0]["params"] = [p for p in model.parameters() if p.requires_grad]
    return model, optimizer


def _worker(rank: int, port: int, run_dir: str, steps: list[int], out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="2",
        ACCELERATE_USE_CPU="true",
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    from unittest import mock

    from accelerate import Accelerator
    from torch.distributed.tensor import DTensor

    from binlat.train.engine import Trainer

    with mock.patch.object(Accelerator, "prepare", _shard_on_prepare):
        for i, max_steps in enumerate(steps):
            cfg = config_from_dict(TrainConfig, run_config(max_steps))
            trainer = Trainer(cfg, run_dir, resume="latest" if i else None)
            try:
                sharded = all(isinstance(p, DTensor) for p in trainer.model.parameters())
                local = sum(p.to_local().numel() for p in trainer.model.parameters())
                full = sum(p.numel() for p in trainer.model.parameters())
                start = trainer.step
                trainer.train()
                info = {
                    "rank": rank,
                    "world": trainer.acc.num_processes,
                    "sharded": sharded,
                    "local": local,
                    "full": full,
                    "start": start,
                    "end": trainer.step,
                }
            finally:
                trainer.close()
            Path(out, f"rank{rank}-run{i}.json").write_text(json.dumps(info))
    trainer.end_distributed()  # as `binlat train` ends a process


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two processes: 2 steps (checkpoint at 2), then a resumed run to 4; and one process straight to 4."""
    root = tmp_path_factory.mktemp("fsdp")
    out = root / "info"
    out.mkdir()
    ctx = mp.spawn(_worker, args=(_free_port(), str(root / "fsdp"), [2, 4], str(out)), nprocs=2, join=False)
    deadline = time.monotonic() + HANG_S  # a run takes ~12 s; a stuck collective must fail the test, not hang CI
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the two FSDP processes did not finish within {HANG_S} s (a gloo collective hung)")
    from binlat.train.engine import Trainer

    single = Trainer(config_from_dict(TrainConfig, run_config(4)), root / "single")
    try:
        single.train()
    finally:
        single.close()
    infos = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    return root / "fsdp", root / "single", infos


def test_the_model_was_sharded_over_two_processes(runs):
    _, _, infos = runs
    assert len(infos) == 4 and all(i["world"] == 2 and i["sharded"] for i in infos), infos
    assert all(i["local"] < i["full"] for i in infos)  # each rank holds a part of every parameter
    assert sorted((i["start"], i["end"]) for i in infos) == [(0, 2), (0, 2), (2, 4), (2, 4)]


def test_checkpoints_hold_full_tensors_and_match_one_process(runs):
    fsdp, single, _ = runs
    assert [p.name for p in list_checkpoints(fsdp)] == ["step-00000002", "step-00000004"]
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_safetensors(list_checkpoints(fsdp)[-1] / name)
        b = load_safetensors(list_checkpoints(single)[-1] / name)
        assert a.keys() == b.keys()
        for k in a:  # gathered, not one rank's shard; and resumed into shards, the same steps as one process
            assert a[k].shape == b[k].shape, k
            torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4, msg=k)
    state = torch.load(list_checkpoints(fsdp)[-1] / "optimizer.pt", weights_only=True)
    plain = torch.load(list_checkpoints(single)[-1] / "optimizer.pt", weights_only=True)
    assert sorted(state["state"]) == sorted(plain["state"])  # keyed by parameter index, as one process writes it
    for i, s in plain["state"].items():
        torch.testing.assert_close(state["state"][i]["exp_avg_sq"], s["exp_avg_sq"], atol=1e-9, rtol=1e-3)


def test_export_of_a_sharded_run(runs, tmp_path):
    fsdp, _, _ = runs
    from binlat.tokenizer import BinaryTokenizer

    out = export_run(fsdp, tmp_path / "tok")
    model = BinaryTokenizer.from_pretrained(out)
    ema = load_safetensors(list_checkpoints(fsdp)[-1] / "ema.safetensors")
    for k, v in model.state_dict().items():
        assert torch.equal(v, ema[k].to(v.dtype)), k


def test_launch_configs_match_accelerates_schema():
    """The FSDP and DeepSpeed launch configs load through accelerate's own config class (unknown keys are errors
    there) and every key of their plugin sections is an option of `accelerate launch`."""
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    options = {a.dest for a in launch_command_parser()._actions}
    for name, section, kind in (
        ("fsdp-8gpu.yaml", "fsdp_config", "FSDP"),
        ("deepspeed-zero2-8gpu.yaml", "deepspeed_config", "DEEPSPEED"),
    ):
        config = ClusterConfig.from_yaml_file(CONFIGS / name)
        assert str(config.distributed_type).endswith(kind) and config.num_processes == 8
        keys = set(getattr(config, section))
        assert keys and keys <= options, (name, keys - options)
