"""Axial rotary position embedding with the release's layout.

Tables are interleaved per axis ([c0, c0, c1, c1, ...]) but applied with the half-split rotation
(dimension d pairs with d + Dh/2). That combination is not a norm-preserving rotation; it is what the
released tokenizer was trained with, so we keep it exactly."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def rotary_tables(
    positions: torch.Tensor, axes_dims: Sequence[int], theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [L, n_axes] (float32) -> (cos, sin), each [L, sum(axes_dims)] float32.

    Angles are formed in float64 and rounded to float32 after cos/sin, as the release does."""
    if positions.shape[-1] != len(axes_dims):
        raise ValueError(f"positions have {positions.shape[-1]} axes but axes_dims has {len(axes_dims)}")
    cos, sin = [], []
    for axis, dim in enumerate(axes_dims):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angles = positions[:, axis].to(torch.float64)[:, None] * freqs[None, :]
        cos.append(angles.cos().float().repeat_interleave(2, dim=-1))
        sin.append(angles.sin().float().repeat_interleave(2, dim=-1))
    return torch.cat(cos, dim=-1), torch.cat(sin, dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., L, Dh]; cos/sin [L, Dh]. Computed in float32, returned in x's dtype."""
    h = x.float()
    first, second = h.chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    return (h * cos + rotated * sin).to(x.dtype)


def rope_1d(
    length: int, head_dim: int, theta: float = 10000.0, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [length, head_dim] of plain 1D RoPE in the half-split layout that apply_rotary rotates (dimension
    d pairs with d + head_dim/2 at one frequency): a true rotation, so attention scores depend on relative position
    only. For new modules; the tokenizer keeps the release's tables (rotary_tables)."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    angles = torch.arange(length, dtype=torch.float64, device=device)[:, None] * freqs[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().float(), angles.sin().float()
