"""Image loading and preprocessing for real-image datasets.

:func:`load_image` turns a path, bytes or file object into a fully decoded PIL image,
or raises :class:`ImageLoadError` (a ``ValueError``) naming the source: unreadable,
zero-byte, truncated, too small, or larger than a pixel limit (decompression bombs).

:class:`ImageTransform` turns any PIL image into the float tensor ``[3, S, S]`` in
``[-1, 1]`` used throughout binlat (the same scaling as ``shapes.to_tensor``):
mode conversion to RGB (transparency composited onto white, 16-bit scaled to 8-bit),
shorter side resized to ``S``, random or centre crop, optional horizontal flip.
"""

from __future__ import annotations

import io
import os
import random
import warnings
from typing import IO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from binlat.io import MAX_IMAGE_BYTES, FileRefused, read_bounded

DEFAULT_MAX_PIXELS = 64_000_000
DEFAULT_MIN_SIDE = 8
WHITE = (255, 255, 255)
# Downscaling first reduces by an integer factor (fast box filter) while the image stays
# at least this many times larger than the target, then finishes with LANCZOS.
REDUCING_GAP = 3.0

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | IO[bytes]
Rng = random.Random | torch.Generator | None


class ImageLoadError(ValueError):
    """An image that cannot be used: unreadable, truncated, too small or too large."""


# ---------------------------------------------------------------- loading


def _describe(source: ImageSource, name: str | None) -> str:
    if name is not None:
        return str(name)
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    return str(getattr(source, "name", "<file object>"))


def load_image(
    source: ImageSource,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
    *,
    name: str | None = None,
    draft_size: tuple[int, int] | None = None,
) -> Image.Image:
    """Open and fully decode an image, applying its EXIF orientation.

    ``source`` is a path, the encoded bytes, or a binary file object; ``name`` (default:
    the path) is what error messages call it. Images with more than ``max_pixels`` pixels
    (``None``: no limit beyond Pillow's own) or a side under ``min_side`` are rejected.
    ``draft_size`` lets JPEG decoding downscale by a power of two while staying at least
    that large in both dimensions (much faster for big photos).

    Raises :class:`ImageLoadError` (a ``ValueError``) naming the image on any failure.
    """
    label = _describe(source, name)
    if isinstance(source, (str, os.PathLike)):
        try:  # a regular file of at most MAX_IMAGE_BYTES, checked before reading (not /dev/zero, not a FIFO)
            data = read_bounded(source, MAX_IMAGE_BYTES, "image")
        except FileRefused as exc:
            raise ImageLoadError(str(exc)) from None
        except OSError as exc:
            raise ImageLoadError(f"cannot read image {label}: {exc.strerror or exc}") from exc
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        try:
            data = source.read(MAX_IMAGE_BYTES + 1)
        except OSError as exc:
            raise ImageLoadError(f"cannot read image {label}: {exc}") from exc
    if not data:
        raise ImageLoadError(f"image {label} is empty (0 bytes)")
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageLoadError(f"image {label} is over the {MAX_IMAGE_BYTES // 2**20} MiB limit for an image")

    try:
        with warnings.catch_warnings():
            # Our own max_pixels check below replaces Pillow's warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(f"image {label} is too large (decompression bomb guard): {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageLoadError(f"cannot identify image {label} ({len(data)} bytes): not a known image format") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageLoadError(f"cannot identify image {label} ({len(data)} bytes): {exc}") from exc

    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageLoadError(
            f"image {label} is {width}x{height} = {width * height} pixels, over the limit of "
            f"{max_pixels} (decompression bomb guard; raise max_pixels to allow it)"
        )
    if width < min_side or height < min_side:
        raise ImageLoadError(f"image {label} is too small: {width}x{height}, need at least {min_side}x{min_side}")

    if draft_size is not None and image.format == "JPEG":
        try:
            image.draft(None, draft_size)
        except Exception:  # noqa: BLE001 - draft is only an optimisation
            pass
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
    except Exception as exc:  # noqa: BLE001 - decoders raise many types on bad data
        raise ImageLoadError(f"cannot decode image {label} (truncated or corrupt): {exc}") from exc
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - a broken EXIF block only loses the orientation
        pass
    return image


# ---------------------------------------------------------------- conversion


def _on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _scaled_to_8bit(image: Image.Image) -> Image.Image:
    """Greyscale with more than 8 bits (I;16*, I, F) -> mode 'L', scaled by value range."""
    arr = np.asarray(image)
    mode = image.mode
    if mode.startswith("I;16"):
        out = arr.astype(np.float32) / 257.0
    elif mode == "I":
        arr = arr.astype(np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        if lo >= 0 and hi <= 65535:
            # 16-bit sources (PNG, TIFF) open as 'I' in some Pillow versions.
            out = arr / 257.0
        else:
            out = (arr - lo) / max(hi - lo, 1e-12) * 255.0
    else:  # "F"
        arr = np.nan_to_num(arr.astype(np.float64))
        lo, hi = float(arr.min()), float(arr.max())
        if lo >= 0 and hi <= 1.0:
            out = arr * 255.0
        elif lo >= 0 and hi <= 255.0:
            out = arr
        else:
            out = (arr - lo) / max(hi - lo, 1e-12) * 255.0
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; transparency is composited onto white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _on_white(image.convert("RGBA"))
    if mode == "P":
        if "transparency" in image.info:
            return _on_white(image.convert("RGBA"))
        return image.convert("RGB")
    if mode.startswith("I") or mode == "F":
        return _scaled_to_8bit(image).convert("RGB")
    if mode in ("L", "1") and "transparency" in image.info:
        return _on_white(image.convert("RGBA"))
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageLoadError(f"cannot convert image mode {mode!r} to RGB: {exc}") from exc


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> float tensor [3, H, W] in [-1, 1] (x / 127.5 - 1)."""
    arr = torch.from_numpy(np.asarray(to_rgb(image), dtype=np.uint8).copy())
    return arr.permute(2, 0, 1).float().div_(127.5).sub_(1.0).contiguous()


# ---------------------------------------------------------------- transform


def _randint(rng: Rng, high: int) -> int:
    """Uniform integer in [0, high]."""
    if high <= 0:
        return 0
    if isinstance(rng, torch.Generator):
        return int(torch.randint(0, high + 1, (1,), generator=rng).item())
    return (rng or random).randint(0, high)


def _uniform(rng: Rng) -> float:
    if isinstance(rng, torch.Generator):
        return float(torch.rand((), generator=rng).item())
    return (rng or random).random()


class ImageTransform:
    """PIL image -> float tensor ``[3, size, size]`` in ``[-1, 1]``.

    Converts any mode to RGB, resizes the shorter side to ``size`` (LANCZOS with a
    reducing gap when shrinking, BICUBIC when enlarging), crops ``size x size`` at a random
    (``random_crop``) or the central position, and flips horizontally with p=0.5 if
    ``hflip``.

    Randomness comes from the ``rng`` passed to the call (a ``random.Random`` or a
    ``torch.Generator``); without one, Python's global ``random`` (which DataLoader seeds
    per worker). Datasets call ``transform(image, rng=transform.rng_for(key, epoch))``,
    which with a ``seed`` makes every crop a function of (seed, epoch, key) only,
    whatever the worker count or order.
    """

    def __init__(self, size: int, random_crop: bool = True, hflip: bool = False, seed: int | None = None) -> None:
        if int(size) != size or size < 1:
            raise ValueError(f"size must be a positive integer, got {size!r}")
        self.size = int(size)
        self.random_crop = bool(random_crop)
        self.hflip = bool(hflip)
        self.seed = seed

    def __repr__(self) -> str:
        return f"ImageTransform(size={self.size}, random_crop={self.random_crop}, hflip={self.hflip}, seed={self.seed})"

    @property
    def is_random(self) -> bool:
        return self.random_crop or self.hflip

    def rng_for(self, key: str, epoch: int = 0) -> random.Random | None:
        """The per-sample generator for ``key`` in ``epoch`` (None when unseeded)."""
        if self.seed is None:
            return None
        return random.Random(f"binlat.ImageTransform/{self.seed}/{epoch}/{key}")

    def resize(self, image: Image.Image) -> Image.Image:
        """Resize so the shorter side is exactly ``size`` (aspect ratio kept)."""
        w, h = image.size
        s = self.size
        if min(w, h) == s:
            return image
        if w <= h:
            new = (s, max(s, round(h * s / w)))
        else:
            new = (max(s, round(w * s / h)), s)
        if new[0] < w:
            return image.resize(new, Image.Resampling.LANCZOS, reducing_gap=REDUCING_GAP)
        return image.resize(new, Image.Resampling.BICUBIC)

    def crop_box(self, width: int, height: int, rng: Rng = None) -> tuple[int, int, int, int]:
        s = self.size
        if self.random_crop:
            left, top = _randint(rng, width - s), _randint(rng, height - s)
        else:
            left, top = (width - s) // 2, (height - s) // 2
        return (left, top, left + s, top + s)

    def __call__(self, image: Image.Image, rng: Rng = None) -> torch.Tensor:
        image = self.resize(to_rgb(image))
        image = image.crop(self.crop_box(*image.size, rng=rng))
        tensor = pil_to_tensor(image)
        if self.hflip and _uniform(rng) < 0.5:
            tensor = tensor.flip(-1).contiguous()
        return tensor
