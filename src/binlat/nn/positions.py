"""Initial values for learned position embeddings."""
from __future__ import annotations

import math

import torch


def sincos_positions(length: int, dim: int) -> torch.Tensor:
    """[1, length, dim]: the Transformer's 1D sin/cos table (sin on even channels, cos on odd ones).

    The generators' learned per-block position embeddings start from it rather than from zeros: with zeros every
    token is alike to attention until the embeddings have grown apart, and the generators' early training stalls
    there (docs/recipe.md, probes GA and GB). Checkpoints overwrite it, so a converted release is unaffected."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    frequency = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)[:, : dim // 2]
    return table[None]
