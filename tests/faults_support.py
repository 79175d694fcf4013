"""What the test_faults_* files share: the tiny tokenizer run they train, the environment of a child
`python -m binlat.cli`, and the check that every checkpoint a run holds is complete and loads."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from binlat import cli
from binlat.io import load_safetensors
from tiny_models import TINY_TOKENIZER_MODEL

TINY = {
    "kind": "tokenizer",
    "model": dict(TINY_TOKENIZER_MODEL),
    "image_size": 64,
    "batch_size": 8,
    "max_steps": 12,
    "warmup_steps": 2,
    "save_every": 1,
    "keep_last": 2,
    "log_every": 1,
    "trackers": [],
}
CHECKPOINT_FILES = {"model.safetensors", "ema.safetensors", "optimizer.pt", "state.json"}


def child_env(**extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **extra,
    }
    env.pop("BINLAT_MODEL", None)
    src = str(Path(cli.__file__).parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))
    return env


def complete_checkpoints(run: Path) -> list[Path]:
    root = run / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if re.fullmatch(r"step-\d{8}", p.name) and (p / "state.json").is_file())


def assert_checkpoints_intact(run: Path) -> None:
    """Every checkpoints/step-* folder is complete and loads; nothing half-deleted carries a checkpoint name."""
    root = run / "checkpoints"
    if not root.is_dir():
        return
    for folder in root.iterdir():
        if not re.fullmatch(r"step-\d{8}", folder.name):
            continue
        assert (folder / "state.json").is_file(), f"{folder.name} has no state.json (half-written or half-deleted)"
        assert {p.name for p in folder.iterdir()} >= CHECKPOINT_FILES, sorted(p.name for p in folder.iterdir())
        state = json.loads((folder / "state.json").read_text())
        assert state["step"] == int(folder.name[5:]) and state["kind"] == "tokenizer"
        model, ema = load_safetensors(folder / "model.safetensors"), load_safetensors(folder / "ema.safetensors")
        assert model.keys() == ema.keys() and model
        torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
