"""Tokenizer training losses: reconstruction, perceptual (LPIPS-style, user-supplied weights), adversarial."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..io import check_values, load_safetensors

# VGG16 feature stack; LPIPS reads the ReLU after the last conv of each stage.
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)


def gradient_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L1 between the images' horizontal and vertical finite differences: an edge-aware term that a per-pixel
    loss, dominated by flat background, weighs too little (corners and small objects are edges)."""

    def diffs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]

    (ax, ay), (bx, by) = diffs(a), diffs(b)
    return ((ax - bx).abs().mean() + (ay - by).abs().mean()) / 2


class PerceptualLoss(nn.Module):
    """LPIPS-style distance on VGG16 features: unit-normalise channels, squared difference, (learned) per-channel
    weights, spatial mean, summed over five stages.

    Weights are read from a local safetensors file holding VGG16 conv weights under torchvision's names
    (`features.<i>.weight/bias`) and, optionally, LPIPS linear heads (`lin<k>.model.1.weight` or `lin<k>.weight`);
    without heads every channel weighs the same."""

    shift: torch.Tensor  # buffers
    scale: torch.Tensor

    def __init__(self, weights_path: str | Path):
        super().__init__()
        state = load_safetensors(weights_path)
        check_values(state, str(weights_path))
        layers: list[nn.Module] = []
        taps: list[int] = []
        channels: list[int] = []
        in_ch = 3
        for spec in _VGG16:
            if isinstance(spec, str):  # "M", the only string
                taps.append(len(layers) - 1)
                channels.append(in_ch)
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(in_ch, spec, 3, padding=1), nn.ReLU()]
                in_ch = spec
        taps.append(len(layers) - 1)
        channels.append(in_ch)
        self.features = nn.Sequential(*layers)
        self.taps = taps
        missing = [k for k in self.features.state_dict() if f"features.{k}" not in state]
        if missing:
            raise ValueError(f"{weights_path}: not VGG16 feature weights (missing features.{missing[0]} ...)")
        self.features.load_state_dict({k: state[f"features.{k}"] for k in self.features.state_dict()})
        heads = []
        for k, c in enumerate(channels):
            w = state.get(f"lin{k}.model.1.weight", state.get(f"lin{k}.weight"))
            heads.append(torch.ones(c) if w is None else w.reshape(-1).clamp(min=0))
        for k, h in enumerate(heads):
            self.register_buffer(f"head{k}", h)
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False).eval()

    def _stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out.append(x)
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        total = a.new_zeros(())
        for k, (fa, fb) in enumerate(zip(self._stages(a), self._stages(b))):
            fa = fa / (fa.norm(dim=1, keepdim=True) + 1e-10)
            fb = fb / (fb.norm(dim=1, keepdim=True) + 1e-10)
            diff = (fa - fb).pow(2) * getattr(self, f"head{k}").view(1, -1, 1, 1)
            total = total + diff.sum(1).mean()
        return total


class PatchDiscriminator(nn.Module):
    """A small PatchGAN: strided convs with GroupNorm and LeakyReLU, one logit per patch."""

    def __init__(self, in_channels: int = 3, width: int = 64, layers: int = 3):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = width
        for i in range(1, layers):
            out = min(width * 2**i, 512)
            blocks += [nn.Conv2d(ch, out, 4, 2, 1), nn.GroupNorm(8 if out % 8 == 0 else 1, out), nn.LeakyReLU(0.2)]
            ch = out
        blocks.append(nn.Conv2d(ch, 1, 3, 1, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.mean()


def adaptive_gan_weight(
    rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4
) -> torch.Tensor:
    """||grad rec|| / ||grad gan|| at the decoder's last layer (VQGAN), so neither loss drowns the other."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0, max_weight).detach()
