"""What the test_data_* files share: small images written at test time (noise, encoded bytes, a PNG whose header
claims a huge canvas, an asymmetric picture), an image folder and WebDataset shards with good and bad samples
and the keys of the good ones, and a folder of images for manifests."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

S = 16  # the side the tests' transforms make images


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny 8x8 PNG whose IHDR claims width x height (a decompression-bomb header)."""
    data = bytearray(_encode(Image.new("L", (8, 8), 0)))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _asymmetric(w: int = 40, h: int = 24) -> Image.Image:
    """Left half black, right half white, with a horizontal gradient in green."""
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[:, w // 2 :, :] = 255
    arr[:, :, 1] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    return Image.fromarray(arr, "RGB")


GOOD_FOLDER_KEYS = {
    "a_rgb.jpg": "a red square",
    "cmyk.jpg": "cyan things",
    "deep16.png": "sixteen bits",
    "empty_caption.png": "",
    "sub/gray.png": "",
    "sub/rgba.png": "see-through",
}
BAD_FOLDER_KEYS = {"corrupt.png", "truncated.png", "zero.png", "tiny.png", "badcap.png"}


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    _noise(48, 40, 1).save(root / "a_rgb.jpg", quality=95)
    (root / "a_rgb.txt").write_text("  a red square \n", encoding="utf-8")
    rgba = np.zeros((30, 30, 4), dtype=np.uint8)
    rgba[:, 15:] = (255, 0, 0, 255)  # left half fully transparent
    Image.fromarray(rgba, "RGBA").save(root / "sub" / "rgba.png")
    (root / "sub" / "rgba.txt").write_text("see-through", encoding="utf-8")
    Image.new("L", (20, 36), 0).save(root / "sub" / "gray.png")  # no caption file
    Image.new("CMYK", (24, 24), (255, 0, 0, 0)).save(root / "cmyk.jpg")
    (root / "cmyk.txt").write_text("cyan things", encoding="utf-8")
    Image.fromarray(np.full((20, 20), 65535, dtype=np.uint16)).save(root / "deep16.png")
    (root / "deep16.txt").write_text("sixteen bits", encoding="utf-8")
    _noise(20, 20, 2).save(root / "empty_caption.png")
    (root / "empty_caption.txt").write_bytes(b"")
    # Bad samples.
    (root / "corrupt.png").write_bytes(np.random.default_rng(3).bytes(2000))
    full = _encode(_noise(64, 64, 4))
    (root / "truncated.png").write_bytes(full[: len(full) // 2])
    (root / "zero.png").write_bytes(b"")
    Image.new("RGB", (1, 1), (1, 2, 3)).save(root / "tiny.png")
    _noise(20, 20, 5).save(root / "badcap.png")
    (root / "badcap.txt").write_bytes(b"caption \xff\xfe\xfa broken")
    # Ignored: non-images, hidden files and folders.
    (root / "notes.md").write_text("not an image")
    _noise(20, 20, 6).save(root / ".hidden.png")
    _noise(20, 20, 7).save(root / ".hidden" / "x.png")
    return root


def _keys(dataset) -> list[str]:
    return [s["key"] for s in dataset]


def _manifest_images(tmp_path: Path) -> Path:
    images = tmp_path / "m" / "imgs"
    images.mkdir(parents=True)
    for i in range(3):
        _noise(24, 20, 10 + i).save(images / f"{i}.png")
    return images


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


@pytest.fixture()
def shards(tmp_path: Path) -> tuple[Path, set[str]]:
    """shard-000..002.tar; 002 is cut in the middle of its third sample's image.

    Returns the folder and the keys of every good sample.
    """
    root = tmp_path / "shards"
    root.mkdir()
    good: set[str] = set()
    with tarfile.open(root / "shard-000.tar", "w") as tf:
        for i in range(4):
            _add(tf, f"s0_{i}.txt", f"caption {i}".encode())
            _add(tf, f"s0_{i}.jpg", _encode(_noise(30, 24, i), "JPEG"))
            good.add(f"s0_{i}")
    with tarfile.open(root / "shard-001.tar", "w") as tf:
        _add(tf, "s1_0.json", json.dumps({"caption": "from json"}).encode())
        _add(tf, "s1_0.png", _encode(_noise(20, 20, 9)))
        _add(tf, "s1_1.json", json.dumps({"text": "text key"}).encode())
        _add(tf, "s1_1.webp", _encode(_noise(20, 20, 10), "WEBP"))
        _add(tf, "s1_2.txt", b"corrupt image")  # skipped: undecodable image
        _add(tf, "s1_2.png", b"\x89PNG not really")
        _add(tf, "s1_3.txt", b"caption without image")  # skipped: no image member
        _add(tf, "s1_4.png", _encode(_noise(20, 20, 11)))  # no caption: unconditional
        good.update({"s1_0", "s1_1", "s1_4"})
    full = root / "full-002.tar"
    with tarfile.open(full, "w") as tf:
        for i in range(4):
            _add(tf, f"s2_{i}.txt", f"cut {i}".encode())
            _add(tf, f"s2_{i}.png", _encode(_noise(40, 40, 20 + i)))
    with tarfile.open(full) as tf:
        cut = tf.getmember("s2_2.png").offset_data + 100
    (root / "shard-002.tar").write_bytes(full.read_bytes()[:cut])
    full.unlink()
    good.update({"s2_0", "s2_1"})
    return root, good
