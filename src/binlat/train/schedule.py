"""The learning-rate schedule and the EMA copy of the weights."""

from __future__ import annotations

import math

import torch

from .config import TrainConfig
from .sharding import full_tensors, like


class EMA:
    """Float32 exponential moving average of the trainable weights, with the usual warm-up of the decay."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            shadow = self.shadow[k] = like(self.shadow[k], v)  # sharded as the model is (FSDP), once
            if v.dtype.is_floating_point:
                shadow.lerp_(v.detach().float(), 1 - decay)
            else:
                shadow.copy_(v)

    def full(self) -> dict[str, torch.Tensor]:
        """The average as full tensors (gathered from the shards under FSDP: every rank calls it)."""
        return full_tensors(self.shadow)


def lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    floor = cfg.min_lr_ratio
    return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))
