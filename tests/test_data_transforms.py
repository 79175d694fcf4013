"""Real-image data, transforms.py: load_image refuses bad files naming them and guards against decompression
bombs; modes convert to RGB; the transform resizes the shorter side and crops, deterministically per seed, and
flips half the time."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from binlat.data.transforms import ImageLoadError, ImageTransform, load_image, to_rgb
from data_support import (  # noqa: F401
    S,
    _asymmetric,
    _encode,
    _noise,
    _png_claiming,
    folder,
)


def test_load_image_rejects_bad_files_naming_them(folder: Path) -> None:
    for name, pattern in [
        ("zero.png", "empty"),
        ("corrupt.png", "cannot identify"),
        ("truncated.png", "truncated"),
        ("tiny.png", "too small: 1x1"),
        ("missing.png", "cannot read"),
    ]:
        with pytest.raises(ImageLoadError, match=pattern) as info:
            load_image(folder / name)
        assert name in str(info.value)
        assert isinstance(info.value, ValueError)
    image = load_image(folder / "a_rgb.jpg")
    assert image.size == (48, 40)
    # Bytes and file objects work too, named by `name`.
    assert load_image((folder / "a_rgb.jpg").read_bytes()).size == (48, 40)
    with pytest.raises(ValueError, match="sample-7"):
        load_image(io.BytesIO(b"junk"), name="sample-7")


def test_load_image_decompression_bomb_guard(tmp_path: Path) -> None:
    # Over our 64 Mpx default but under Pillow's own limit: our message names the size.
    path = tmp_path / "big.png"
    path.write_bytes(_png_claiming(10_000, 10_000))
    with pytest.raises(ValueError, match=r"big\.png is 10000x10000 = 100000000 pixels"):
        load_image(path)
    # Far over Pillow's limit: still a ValueError naming the file and the pixel count.
    path.write_bytes(_png_claiming(20_000, 20_000))
    with pytest.raises(ValueError, match=r"big\.png.*400000000 pixels"):
        load_image(path)
    # A low explicit limit applies to ordinary images.
    small = tmp_path / "small.png"
    _noise(100, 50).save(small)
    with pytest.raises(ValueError, match="100x50 = 5000 pixels, over the limit of 4000"):
        load_image(small, max_pixels=4000)
    assert load_image(small, max_pixels=5000).size == (100, 50)


def test_modes_convert_to_rgb_correctly() -> None:
    t = ImageTransform(S, random_crop=False)
    cases = {
        "rgba transparent": (Image.new("RGBA", (20, 20), (255, 0, 0, 0)), (1.0, 1.0, 1.0)),
        "rgba opaque": (Image.new("RGBA", (20, 20), (255, 0, 0, 255)), (1.0, -1.0, -1.0)),
        "la transparent": (Image.new("LA", (20, 20), (0, 0)), (1.0, 1.0, 1.0)),
        "gray": (Image.new("L", (20, 20), 0), (-1.0, -1.0, -1.0)),
        "1-bit": (Image.new("1", (20, 20), 1), (1.0, 1.0, 1.0)),
        "cmyk": (Image.new("CMYK", (20, 20), (0, 0, 0, 0)), (1.0, 1.0, 1.0)),
        "i16 max": (Image.fromarray(np.full((20, 20), 65535, np.uint16)), (1.0, 1.0, 1.0)),
        "i16 mid": (Image.fromarray(np.full((20, 20), 128 * 257, np.uint16)), (128 / 127.5 - 1,) * 3),
        "i32 16-bit range": (Image.fromarray(np.full((20, 20), 65535, np.int32)), (1.0, 1.0, 1.0)),
        "float": (Image.fromarray(np.full((20, 20), 0.0, np.float32)), (-1.0, -1.0, -1.0)),
    }
    palette = Image.new("P", (20, 20), 0)
    palette.putpalette([0, 0, 0] + [255, 0, 0] * 255)
    palette.info["transparency"] = 0
    cases["palette transparent"] = (palette, (1.0, 1.0, 1.0))
    for name, (image, rgb) in cases.items():
        out = t(image)
        assert out.shape == (3, S, S) and out.dtype == torch.float32, name
        expected = torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1).expand(3, S, S)
        assert torch.allclose(out, expected, atol=1e-5), (name, out[:, 0, 0])
    # 16-bit values survive a PNG round trip and keep their scale.
    gradient = Image.fromarray((np.arange(256, dtype=np.uint16) * 257).reshape(16, 16))
    reloaded = Image.open(io.BytesIO(_encode(gradient)))
    assert reloaded.mode.startswith("I")
    assert np.array_equal(np.asarray(to_rgb(reloaded))[..., 0].ravel(), np.arange(256))


def test_transform_resizes_shorter_side_and_crops() -> None:
    image = _noise(100, 50)
    centre = ImageTransform(32, random_crop=False)
    out = centre(image)
    assert out.shape == (3, 32, 32)
    assert out.min() >= -1 and out.max() <= 1
    assert centre.resize(image).size == (64, 32)
    assert centre.resize(_noise(30, 90)).size == (32, 96)
    assert torch.equal(out, centre(image))  # centre crop: no randomness
    # A big image goes through the reducing-gap path and still lands on size x size.
    assert ImageTransform(S, random_crop=False)(_noise(1000, 700)).shape == (3, S, S)
    # Upscaling small inputs works too.
    assert ImageTransform(64)(_noise(10, 12), rng=random.Random(0)).shape == (3, 64, 64)


def test_random_crop_is_deterministic_given_rng() -> None:
    image = _noise(120, 40)
    t = ImageTransform(S, random_crop=True)
    a = t(image, rng=random.Random(123))
    assert torch.equal(a, t(image, rng=random.Random(123)))
    crops = {tuple(t(image, rng=random.Random(seed)).flatten()[:8].tolist()) for seed in range(8)}
    assert len(crops) > 1  # different seeds move the crop
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(t(image, rng=g1), t(image, rng=g2))
    # Seeded rng_for: a function of (seed, epoch, key) only.
    seeded = ImageTransform(S, seed=7)
    assert torch.equal(seeded(image, rng=seeded.rng_for("k", 0)), seeded(image, rng=seeded.rng_for("k", 0)))
    assert ImageTransform(S).rng_for("k") is None


def test_hflip_flips_half_the_time() -> None:
    image = _asymmetric()
    plain = ImageTransform(S, random_crop=False)(image)
    t = ImageTransform(S, random_crop=False, hflip=True)
    flipped = 0
    for seed in range(40):
        out = t(image, rng=random.Random(seed))
        if torch.equal(out, plain.flip(-1)):
            flipped += 1
        else:
            assert torch.equal(out, plain)
    assert 8 <= flipped <= 32
    assert not torch.equal(plain, plain.flip(-1))
