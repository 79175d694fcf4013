"""Gradient checkpointing of transformer blocks: trade recomputation for activation memory in training."""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def run_block(block: torch.nn.Module, *args, checkpointing: bool = False):
    """block(*args), recomputing its activations in the backward pass when `checkpointing` is on."""
    if checkpointing and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)
