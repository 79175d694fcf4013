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


def sincos_grid_positions(rows: int, cols: int, dim: int, leading: int = 0) -> torch.Tensor:
    """[1, leading + rows * cols, dim]: a 2D sin/cos table over a rows x cols grid in row-major order, half the
    channels for the row and half for the column (as ViTs lay out 2D positions), after `leading` zero rows (the AR
    generator's start token). For generators over a region tokenizer (region_shortcut), whose token k is region k
    of the image grid: "above" is then a row difference, which a 1D table hides among neighbours."""
    half = dim // 2
    row = sincos_positions(rows, half)[0]
    col = sincos_positions(cols, dim - half)[0]
    table = torch.cat((row[:, None, :].expand(rows, cols, half), col[None, :, :].expand(rows, cols, dim - half)), -1)
    return torch.cat((torch.zeros(leading, dim), table.reshape(rows * cols, dim)))[None]
