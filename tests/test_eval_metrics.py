"""The pixel metrics of `binlat eval` (binlat.metrics): PSNR and SSIM against hand values and torchmetrics, and
the codec byte-budget search (the highest quality that fits, the smallest file when none does, monotonicity
checked)."""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

import binlat.eval.reconstruction as rec
import binlat.metrics as metrics

# ---------------------------------------------------------------- PSNR / SSIM


def test_psnr_ssim_identical_images() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (2, 3, 24, 20), generator=g, dtype=torch.uint8)
    assert (metrics.psnr(a, a.clone()) == metrics.PSNR_CAP_DB).all()  # capped, so a mean over images stays finite
    one_off = a.clone()
    one_off[0, 0, 0, 0] ^= 1  # one grey level in one channel of one pixel: the largest finite PSNR, under the cap
    assert math.isfinite(metrics.psnr(a, one_off)[0]) and metrics.psnr(a, one_off)[0] < metrics.PSNR_CAP_DB
    assert torch.allclose(metrics.ssim(a, a.clone()), torch.ones(2, dtype=torch.float64), atol=1e-12)


def test_psnr_known_perturbation() -> None:
    a = torch.full((1, 3, 16, 16), 100, dtype=torch.uint8)
    b = a.clone()
    b[0, 1, 3, 4] = 110  # one value off by 10: MSE = 100 / (3*16*16)
    assert metrics.psnr(a, b).item() == pytest.approx(10 * math.log10(255**2 * 768 / 100), abs=1e-9)
    c = a + 5  # every value off by 5: MSE = 25
    assert metrics.psnr(a, c).item() == pytest.approx(10 * math.log10(255**2 / 25), abs=1e-9)
    assert metrics.psnr(a, c).item() == pytest.approx(34.1514, abs=1e-4)
    # the [-1, 1] -> uint8 conversion clamps and rounds like to_pil
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 5)
    assert metrics.to_uint8(x).flatten().tolist() == [0, 0, 128, 255, 255]


def test_ssim_hand_values() -> None:
    # Constant images: no variance, so SSIM = (2 m1 m2 + C1) / (m1^2 + m2^2 + C1) exactly.
    m1, m2 = 0.2, 0.7
    a = torch.full((1, 3, 16, 16), m1, dtype=torch.float64)
    b = torch.full((1, 3, 16, 16), m2, dtype=torch.float64)
    c1 = 0.01**2
    assert metrics.ssim(a, b).item() == pytest.approx((2 * m1 * m2 + c1) / (m1**2 + m2**2 + c1), abs=1e-12)
    # Symmetric, below 1 for a perturbation, and the Gaussian window is the normalised 11-tap sigma-1.5 one.
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=g, dtype=torch.float64)
    y = (x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    s = metrics.ssim(x, y)
    assert torch.allclose(s, metrics.ssim(y, x), atol=1e-12) and (s < 1).all() and (s > 0).all()
    w = metrics.gaussian_window()
    assert w.shape == (11,) and w.sum().item() == pytest.approx(1.0) and w.argmax().item() == 5
    assert (w[4] / w[5]).item() == pytest.approx(math.exp(-1 / (2 * 1.5**2)))
    with pytest.raises(ValueError, match="at least 11x11"):
        metrics.ssim(x[..., :8, :8], y[..., :8, :8])


def test_ssim_matches_torchmetrics_inside_the_border() -> None:
    """torchmetrics reflect-pads and averages the whole map; cropping its pad gives the standard valid SSIM."""
    tm = pytest.importorskip("torchmetrics.functional.image")
    g = torch.Generator().manual_seed(2)
    x = torch.rand(3, 3, 32, 40, generator=g, dtype=torch.float64)
    y = (x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    _, full = tm.structural_similarity_index_measure(
        y, x, gaussian_kernel=True, sigma=1.5, kernel_size=11, data_range=1.0, reduction="none", return_full_image=True
    )
    assert torch.allclose(metrics.ssim(x, y), full[..., 5:-5, 5:-5].flatten(1).mean(1), atol=1e-10)


# ---------------------------------------------------------------- codecs at a byte budget


def _photo_like(size: int = 64) -> Image.Image:
    """A smooth gradient with texture: its file size grows steadily with quality."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([xx, yy, (xx + yy) / 2], -1) * 200 + rng.normal(0, 20, (size, size, 3))
    return Image.fromarray(base.clip(0, 255).astype(np.uint8), "RGB")


@pytest.mark.parametrize("codec", ["jpeg", "webp"])
def test_budget_search_takes_highest_fitting_quality(codec: str) -> None:
    image = _photo_like()
    budget = len(rec.encode_image(image, codec, 50))
    choice = rec.fit_to_budget(image, codec, budget)
    assert choice.fits and choice.quality >= 50 and choice.size <= budget
    assert choice.size == len(rec.encode_image(image, codec, choice.quality, choice.method)) == len(choice.data)
    if choice.quality < 100:
        assert len(rec.encode_image(image, codec, choice.quality + 1, choice.method)) > budget
    # a budget above every file: quality 100
    big = rec.fit_to_budget(image, codec, 10**7)
    assert big.fits and big.quality == 100


@pytest.mark.parametrize("codec", ["jpeg", "webp"])
def test_budget_search_none_fits_gives_smallest_file(codec: str) -> None:
    image = _photo_like()
    choice = rec.fit_to_budget(image, codec, 10)
    assert not choice.fits and choice.quality == 1 and choice.size > 10
    methods = [None] if codec == "jpeg" else [4, 6]
    assert choice.size == min(len(rec.encode_image(image, codec, 1, m)) for m in methods)
    assert choice.method in methods


def test_budget_search_checks_monotonicity(monkeypatch) -> None:
    """A codec whose size drops at one high quality: bisection alone would miss it; the check finds it."""
    sizes = {q: 10 * q for q in range(1, 101)} | {90: 50}
    monkeypatch.setattr(rec, "encode_image", lambda image, codec, q, method=None: b"x" * sizes[q])
    choice = rec.fit_to_budget(Image.new("RGB", (8, 8)), "jpeg", 300)
    assert choice.quality == 90 and choice.size == 50 and not choice.monotone
    sizes[90] = 900  # monotone again: bisection's answer, checked
    choice = rec.fit_to_budget(Image.new("RGB", (8, 8)), "jpeg", 300)
    assert choice.quality == 30 and choice.monotone
