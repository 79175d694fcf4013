"""Feed-forward layers and the timestep embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases (tokenizer blocks)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden_dim, bias=False)
        self.up = nn.Linear(dim, hidden_dim, bias=False)
        self.down = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class GeluMLP(nn.Module):
    """fc2(gelu_tanh(fc1(x))) with biases (generator blocks)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class TimestepEmbedding(nn.Module):
    """t enters as one raw number per sample through Linear(1 -> dim), SiLU, Linear, as in the release
    (no sinusoidal features: t lives in [0, 1] and the first layer learns its own scaling)."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(1, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1, 1).to(self.fc1.weight.dtype)
        return self.fc2(F.silu(self.fc1(t)))


class PooledTextEmbedding(nn.Module):
    """The masked mean of a prompt's token states through Linear, SiLU, Linear: one vector per prompt, added to
    the time embedding so that every adaLN modulation sees the whole caption (DiT's class conditioning)."""

    def __init__(self, text_dim: int, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(text_dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        keep = mask.to(states.dtype).unsqueeze(-1)
        mean = (states * keep).sum(1) / keep.sum(1).clamp(min=1)
        return self.fc2(F.silu(self.fc1(mean)))
