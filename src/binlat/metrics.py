"""Pixel metrics of images against their originals, shared by training (the tokenizer's running PSNR), evaluation
and the probes: PSNR (capped for exact reconstructions, so means stay finite) and SSIM (Wang et al. 2004: Gaussian
window 11x11, sigma 1.5, K1 0.01, K2 0.03, on [0, 1] RGB, averaged over channels). A leaf: it imports nothing of
binlat, so any layer may use it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 [0, 255] (clamped and rounded exactly as ``pipeline.to_pil``)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape != b.shape:
        raise ValueError(f"images to compare differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.ndim == 3:
        a, b = a.unsqueeze(0), b.unsqueeze(0)
    if a.ndim != 4:
        raise ValueError(f"expected images [N, C, H, W] or [C, H, W], got {tuple(a.shape)}")
    return a, b


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of uint8 images [N, C, H, W] (peak 255): 10 log10(255^2 / MSE); inf where equal."""
    a, b = _check_pair(a, b)
    if a.dtype != torch.uint8 or b.dtype != torch.uint8:
        raise ValueError("psnr expects uint8 images in [0, 255] (use to_uint8 on [-1, 1] tensors)")
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return torch.tensor([psnr_of_mse(float(m), 255.0) for m in mse], dtype=torch.float64)


# PSNR of an exact reconstruction (MSE 0), which would be infinite and make every mean it enters infinite: capped
# here, above any non-exact uint8 image up to 512 px (one grey level off in one channel of one pixel of a 512 x 512
# image is 107.1 dB; at 64 px, 89.0 dB). Reports count exact reconstructions apart as well.
PSNR_CAP_DB = 120.0


def psnr_of_mse(mse: float, peak_to_peak: float = 2.0) -> float:
    """10 log10(range^2 / MSE) in dB, at most PSNR_CAP_DB (an exact reconstruction). The default range is that of
    [-1, 1] images."""
    return PSNR_CAP_DB if mse <= 0 else min(PSNR_CAP_DB, 10 * math.log10(peak_to_peak**2 / mse))


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Normalised 1-D Gaussian of `size` taps centred on the middle one (float64)."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _filter(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' Gaussian filtering of [N, C, H, W], channel by channel."""
    c = x.shape[1]
    x = F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return F.conv2d(x, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)


def ssim(
    a: torch.Tensor,
    b: torch.Tensor,
    window: int = SSIM_WINDOW,
    sigma: float = SSIM_SIGMA,
    k1: float = SSIM_K1,
    k2: float = SSIM_K2,
) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) of RGB images [N, C, H, W]: uint8 (scaled to [0, 1]) or floats in [0, 1].

    Local statistics under a Gaussian window (11x11, sigma 1.5) over the positions where the window fits inside the
    image (no padding), constants C1 = (K1 L)^2, C2 = (K2 L)^2 with L = 1; the SSIM map is averaged over those
    positions and over channels. Identical images give exactly 1."""
    a, b = _check_pair(a, b)
    if a.shape[-1] < window or a.shape[-2] < window:
        raise ValueError(f"SSIM needs images of at least {window}x{window} pixels, got {a.shape[-2]}x{a.shape[-1]}")
    a = a.double() / 255 if a.dtype == torch.uint8 else a.double()
    b = b.double() / 255 if b.dtype == torch.uint8 else b.double()
    g = gaussian_window(window, sigma).to(a.device)
    c1, c2 = (k1 * 1.0) ** 2, (k2 * 1.0) ** 2
    mu_a, mu_b = _filter(a, g), _filter(b, g)
    var_a = _filter(a * a, g) - mu_a**2
    var_b = _filter(b * b, g) - mu_b**2
    cov = _filter(a * b, g) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return (num / den).flatten(1).mean(1)
