"""2x2 token down- and up-sampling between transformer blocks (image rows only; latent rows pass through)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def tokens_to_map(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, h*w, D] row-major tokens -> [B, D, h, w]."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)


def map_to_tokens(grid: torch.Tensor) -> torch.Tensor:
    """[B, D, h, w] -> [B, h*w, D] row-major."""
    return grid.flatten(2).transpose(1, 2)


class Downsample(nn.Module):
    """Strided 3x3 conv plus a 2x2 mean shortcut (the pixel-unshuffle-and-average of the release)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size=3, stride=2, padding=1)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return self.conv(grid) + F.avg_pool2d(grid, 2)


class Upsample(nn.Module):
    """3x3 conv to 4x channels then pixel shuffle, plus a nearest-neighbour (repeat) shortcut."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, 4 * dim, kernel_size=3, padding=1)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        shortcut = grid.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        return F.pixel_shuffle(self.conv(grid), 2) + shortcut
