"""The reliability catalogue, data readers part.

load_image refuses an empty, truncated, unknown, 1x1 image and a decompression bomb's header with ImageLoadError,
and loads CMYK, grayscale, alpha and 16-bit images as the expected RGB; ImageFolderDataset, WebDatasetShards and
ManifestDataset skip and count bad samples and go on; data specs and shard lists never run a URL's command. What
every case asserts and Env: tests/reliability_support.py.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from binlat.data.readers import ImageFolderDataset, ManifestDataset, WebDatasetShards, expand_shards, make_dataset
from binlat.data.transforms import ImageLoadError, ImageTransform, load_image, to_rgb
from reliability_support import (  # noqa: F401
    Env,
    claimed_canvas_png,
    command_shard,
    env,
    new_catalogue,
    noise_png,
    png_bytes,
    snapshot,
)

CASES, ENTRY_OF, case = new_catalogue()


# ============================================================================================================
# data readers


@case("data-zero-byte-image", "load_image")
def _(env: Env) -> None:
    path = env.tmp / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageLoadError, match=r"empty\.png is empty \(0 bytes\)"):
        load_image(path)


@case("data-truncated-png", "load_image")
def _(env: Env) -> None:
    path = env.tmp / "cut.png"
    path.write_bytes(noise_png()[:6000])
    with pytest.raises(ImageLoadError, match=r"cannot decode image .*cut\.png \(truncated or corrupt\)"):
        load_image(path)


@case("data-truncated-jpeg", "load_image")
def _(env: Env) -> None:
    arr = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = png_bytes(Image.fromarray(arr), "JPEG")
    with pytest.raises(ImageLoadError, match=r"cannot decode image cut\.jpg \(truncated or corrupt\)"):
        load_image(data[: len(data) // 2], name="cut.jpg")


@case("data-not-an-image", "load_image")
def _(env: Env) -> None:
    with pytest.raises(ImageLoadError, match=r"cannot identify image notes\.png .*not a known image format"):
        load_image(b"these are my notes, not a picture", name="notes.png")


@case("data-1x1-image", "load_image")
def _(env: Env) -> None:
    with pytest.raises(ImageLoadError, match=r"is too small: 1x1, need at least 8x8"):
        load_image(png_bytes(Image.new("RGB", (1, 1), (255, 0, 0))))


@case("data-20000x20000-header-decompression-bomb", "load_image")
def _(env: Env) -> None:
    data = claimed_canvas_png(20_000, 20_000)
    assert len(data) < 100
    with pytest.raises(ImageLoadError, match="too large .*decompression bomb guard|decompression bomb guard"):
        load_image(data, name="bomb.png")


@case("data-cmyk-loads-as-rgb", "load_image")
def _(env: Env) -> None:
    for fmt, tolerance in (("TIFF", 0), ("JPEG", 3)):
        data = png_bytes(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), fmt)  # pure red in CMYK
        rgb = np.asarray(to_rgb(load_image(data)), dtype=int)
        assert rgb.shape == (16, 16, 3)
        assert np.abs(rgb - [255, 0, 0]).max() <= tolerance, (fmt, rgb[0, 0])


@case("data-grayscale-loads-as-rgb", "load_image")
def _(env: Env) -> None:
    image = load_image(png_bytes(Image.new("L", (16, 16), 100)))
    assert image.mode == "L"
    assert (np.asarray(to_rgb(image)) == 100).all() and to_rgb(image).mode == "RGB"
    tensor = ImageTransform(16, random_crop=False)(image)
    assert tensor.shape == (3, 16, 16) and torch.allclose(tensor, torch.full_like(tensor, 100 / 127.5 - 1))


@case("data-alpha-composited-on-white", "load_image")
def _(env: Env) -> None:
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[:, :8] = (255, 0, 0, 255)  # opaque red
    rgba[:, 8:] = (0, 0, 255, 0)  # fully transparent (its colour must not show)
    rgb = np.asarray(to_rgb(load_image(png_bytes(Image.fromarray(rgba, "RGBA")))))
    assert (rgb[:, :8] == [255, 0, 0]).all() and (rgb[:, 8:] == [255, 255, 255]).all()
    la = np.asarray(to_rgb(load_image(png_bytes(Image.fromarray(rgba[..., [0, 3]], "LA")))))
    assert (la[:, :8] == 255).all() and (la[:, 8:] == 255).all()


@case("data-16-bit-scaled-to-8-bit", "load_image")
def _(env: Env) -> None:
    arr = np.full((16, 16), 257 * 200, dtype=np.uint16)
    arr[:, 8:] = 65535
    image = load_image(png_bytes(Image.fromarray(arr)))
    assert image.mode in ("I;16", "I")
    rgb = np.asarray(to_rgb(image))
    assert rgb.shape == (16, 16, 3) and (rgb[:, :8] == 200).all() and (rgb[:, 8:] == 255).all()


@case("data-image-folder-skips-and-counts-bad-files", "ImageFolderDataset")
def _(env: Env) -> None:
    root = env.tmp / "images"
    root.mkdir()
    (root / "good.png").write_bytes(png_bytes(Image.new("RGB", (40, 40), (0, 0, 255))))
    (root / "good.txt").write_text("a blue square")
    (root / "cmyk.jpg").write_bytes(png_bytes(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG"))
    (root / "cut.png").write_bytes(noise_png()[:5000])
    (root / "empty.png").write_bytes(b"")
    (root / "tiny.png").write_bytes(png_bytes(Image.new("RGB", (1, 1))))
    (root / "bomb.png").write_bytes(claimed_canvas_png(20_000, 20_000))
    (root / "badcaption.png").write_bytes(png_bytes(Image.new("RGB", (40, 40))))
    (root / "badcaption.txt").write_bytes(b"caf\xe9")
    before = snapshot(root)
    ds = ImageFolderDataset(root, ImageTransform(32, random_crop=False))
    samples = list(ds)
    assert [s["key"] for s in samples] == ["cmyk.jpg", "good.png"]
    assert ds.skipped == 5
    assert samples[1]["caption"] == "a blue square" and samples[1]["image"].shape == (3, 32, 32)
    assert samples[0]["image"][0].mean() > 0.95 and samples[0]["image"][1:].mean() < -0.95  # red
    assert snapshot(root) == before


@case("data-tar-shard-cut-mid-member", "WebDatasetShards")
def _(env: Env) -> None:
    def shard(path: Path, prefix: str, n: int) -> list[tuple[str, int]]:
        with tarfile.open(path, "w") as tf:
            for i in range(n):
                for ext, data in (("png", noise_png(32, seed=i)), ("txt", f"sample {prefix}{i}".encode())):
                    info = tarfile.TarInfo(f"{prefix}{i}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        with tarfile.open(path) as tf:
            return [(m.name, m.offset_data) for m in tf.getmembers()]

    full = env.tmp / "full.tar"
    members = dict(shard(full, "a", 3))
    cut = members["a1.png"] + 500  # in the middle of the second sample's image
    (env.tmp / "shard-000.tar").write_bytes(full.read_bytes()[:cut])
    full.unlink()
    shard(env.tmp / "shard-001.tar", "b", 2)
    ds = WebDatasetShards(str(env.tmp / "shard-{000..001}.tar"), ImageTransform(32, random_crop=False))
    keys = [s["key"] for s in ds]
    assert keys == ["a0", "b0", "b1"]  # the stream went on to the next shard
    assert ds.skipped == 1


@case("data-manifest-missing-files-skipped", "ManifestDataset")
def _(env: Env) -> None:
    (env.tmp / "here.png").write_bytes(png_bytes(Image.new("RGB", (40, 40), (9, 9, 9))))
    manifest = env.tmp / "data.jsonl"
    manifest.write_text(
        "\n".join(
            json.dumps(e)
            for e in [
                {"path": "gone.png", "caption": "missing"},
                {"path": "here.png", "caption": "present"},
                {"path": str(env.tmp / "also-gone.jpg"), "caption": "missing too"},
            ]
        )
        + "\n"
    )
    before = manifest.read_bytes()
    ds = ManifestDataset(manifest, ImageTransform(32, random_crop=False))
    samples = list(ds)
    assert [s["caption"] for s in samples] == ["present"] and ds.skipped == 2
    assert manifest.read_bytes() == before


@case("data-manifest-malformed-line", "ManifestDataset")
def _(env: Env) -> None:
    manifest = env.tmp / "data.jsonl"
    manifest.write_text('{"path": "a.png", "caption": "ok"}\n{"path": "b.png", "caption": \n')
    with pytest.raises(ValueError, match=r"data\.jsonl line 2: invalid JSON"):
        ManifestDataset(manifest, ImageTransform(32))


@case("data-unknown-spec", "make_dataset")
def _(env: Env) -> None:
    with pytest.raises(ValueError, match=r"unknown data spec .*no such file or directory"):
        make_dataset(str(env.tmp / "nowhere"), 32)


@case("data-shard-list-url-never-runs", "expand_shards")
def _(env: Env) -> None:
    """A shard list ('::' list, Python list, brace pattern) cannot smuggle a URL in beside local shards."""
    url, marker = command_shard(env)
    tar = env.tmp / "x.tar"
    with tarfile.open(tar, "w"):
        pass
    for urls in (f"{tar}::{url}", [str(tar), url], f"pipe:{{touch {marker},true}}; cat x.tar"):
        with pytest.raises(ValueError, match="--allow-data-commands"):
            expand_shards(urls)
        with pytest.raises(ValueError, match="--allow-data-commands"):
            make_dataset(urls if isinstance(urls, str) else "::".join(urls), 64)
    assert not marker.exists()
    assert expand_shards(str(tar)) == [str(tar.resolve())]  # local shards come back absolute: never a scheme


@case("data-shard-glob-matches-nothing", "expand_shards")
def _(env: Env) -> None:
    with pytest.raises(ValueError, match=r"shard glob .*shard-\*\.tar' matches no files"):
        expand_shards(str(env.tmp / "shard-*.tar"))


# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_catalogue(name: str, env: Env) -> None:
    CASES[name](env)
