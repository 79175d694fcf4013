"""What the binlat.processes test files share: tiny diffusion and AR configs, weights randomised so that
zero-initialised parts are active, hand-made left-padded text features, a binary check, and a fake diffusion
network that returns a fixed tensor and records its inputs."""

from __future__ import annotations

import torch
from torch import nn

from binlat.generators import ARConfig, DiffusionConfig
from binlat.text import TextFeatures

TEXT_DIM = 12
SHARED = dict(num_bits=8, num_tokens=6, num_layers=2, num_heads=2, head_dim=8, text_dim=TEXT_DIM)
CFG, AR_CFG = DiffusionConfig(**SHARED), ARConfig(**SHARED)


# --- helpers --------------------------------------------------------------------------------------------------
def randomise(model: nn.Module, seed: int) -> nn.Module:
    """Overwrite every parameter with N(0, 0.3^2) values, so that zero-initialised parts (adaLN-Zero gates,
    position embeddings) are active and the output depends on text, time and position."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def text(lengths: list[int], seed: int, num_layers: int = 2) -> TextFeatures:
    """Hand-made features, one [N, L, TEXT_DIM] per block, LEFT padded; padded positions hold garbage
    (nonzero values) on purpose: they must not matter."""
    g = torch.Generator().manual_seed(seed)
    n, length = len(lengths), max(lengths)
    layers = [torch.randn(n, length, TEXT_DIM, generator=g) for _ in range(num_layers)]
    mask = torch.zeros(n, length, dtype=torch.bool)
    for i, k in enumerate(lengths):
        mask[i, length - k :] = True
    return TextFeatures(layers=layers, mask=mask)


def is_binary(x: torch.Tensor) -> bool:
    return bool(((x == 0) | (x == 1)).all())


class ConstantDiffusionNet(nn.Module):
    """Fake diffusion network: returns a fixed tensor (broadcast over the batch) and records its inputs."""

    def __init__(self, out: torch.Tensor | None = None, fn=None, config: DiffusionConfig | None = None):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))
        self.out, self.fn = out, fn
        self.config = config
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x_t, t, layers, mask):
        self.calls.append((x_t.clone(), t.clone()))
        if self.fn is not None:
            return self.fn(x_t, t)
        return self.out.expand(x_t.shape[0], *self.out.shape[1:]).clone()
