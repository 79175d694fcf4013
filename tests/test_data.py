"""Tests for real-image data: transforms.py (loading, conversion, crops) and readers.py
(image folders, manifests, WebDataset shards, make_dataset, collate).

All fixtures are written into tmp_path at test time.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import random
import struct
import sys
import tarfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

try:
    import binlat.data.readers  # noqa: F401
except ImportError:  # running from a checkout without an installed package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from binlat.data.collate import collate
from binlat.data.readers import (
    ImageFolderDataset,
    ManifestDataset,
    WebDatasetShards,
    make_dataset,
)
from binlat.data.shapes import CATEGORIES, ShapesStream
from binlat.data.transforms import ImageLoadError, ImageTransform, load_image, to_rgb

S = 16


# ---------------------------------------------------------------- fixture helpers


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


# ---------------------------------------------------------------- load_image


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


# ---------------------------------------------------------------- conversion and transform


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


# ---------------------------------------------------------------- image folder


def test_image_folder_skips_and_counts_bad_samples(folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    ds = ImageFolderDataset(folder, ImageTransform(S, seed=0))
    assert len(ds.files) == len(GOOD_FOLDER_KEYS) + len(BAD_FOLDER_KEYS)
    with caplog.at_level(logging.WARNING, logger="binlat.data"):
        samples = list(ds)
    assert [s["key"] for s in samples] == sorted(GOOD_FOLDER_KEYS)
    assert {s["key"]: s["caption"] for s in samples} == GOOD_FOLDER_KEYS
    assert ds.skipped == len(BAD_FOLDER_KEYS)
    logged = " ".join(r.getMessage() for r in caplog.records if r.name == "binlat.data")
    for key in BAD_FOLDER_KEYS:
        assert f"skipping sample {key}" in logged
    assert "not valid UTF-8" in logged
    for s in samples:
        assert s["image"].shape == (3, S, S) and s["image"].dtype == torch.float32
        assert -1.0 <= float(s["image"].min()) and float(s["image"].max()) <= 1.0
    by_key = {s["key"]: s["image"] for s in samples}
    assert torch.allclose(by_key["deep16.png"], torch.ones(3, S, S))
    assert torch.allclose(by_key["sub/gray.png"], -torch.ones(3, S, S))
    # The RGBA's transparent half is white: no pure-black pixels, some white ones.
    assert (by_key["sub/rgba.png"] == 1.0).all(dim=0).any()


def test_image_folder_crops_deterministic_per_seed_and_epoch(folder: Path) -> None:
    def images(seed: int, epoch: int) -> dict[str, torch.Tensor]:
        ds = ImageFolderDataset(folder, ImageTransform(S, random_crop=True, hflip=True, seed=seed))
        ds.set_epoch(epoch)
        return {s["key"]: s["image"] for s in ds}

    a, b = images(0, 0), images(0, 0)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = images(0, 1)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    # Shuffled order is a seeded permutation of the same samples.
    ds = ImageFolderDataset(folder, ImageTransform(S, seed=0), shuffle=True, seed=3)
    order = _keys(ds)
    assert sorted(order) == sorted(GOOD_FOLDER_KEYS) and order == _keys(ds)


def test_image_folder_dataloader_two_workers_yields_each_good_sample_once(folder: Path) -> None:
    ds = ImageFolderDataset(folder, ImageTransform(S, seed=0))
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate)
    keys: list[str] = []
    for batch in loader:
        assert batch["image"].shape[1:] == (3, S, S)
        assert len(batch["caption"]) == len(batch["key"]) == batch["image"].shape[0]
        keys.extend(batch["key"])
    assert sorted(keys) == sorted(GOOD_FOLDER_KEYS)


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nope", ImageTransform(S))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFolderDataset(tmp_path / "empty", ImageTransform(S))


# ---------------------------------------------------------------- manifests


def _manifest_images(tmp_path: Path) -> Path:
    images = tmp_path / "m" / "imgs"
    images.mkdir(parents=True)
    for i in range(3):
        _noise(24, 20, 10 + i).save(images / f"{i}.png")
    return images


def test_jsonl_manifest(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    images = _manifest_images(tmp_path)
    manifest = tmp_path / "m" / "train.jsonl"
    lines = [
        {"path": "imgs/0.png", "caption": " zero "},
        {"image": str(images / "1.png"), "text": "one"},  # absolute path, alternative keys
        {"path": "imgs/missing.png", "caption": "gone"},
        {"path": "imgs/2.png"},  # no caption: unconditional
    ]
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8")
    ds = ManifestDataset(manifest, ImageTransform(S, seed=0))
    with caplog.at_level(logging.WARNING, logger="binlat.data"):
        samples = list(ds)
    assert [(s["key"], s["caption"]) for s in samples] == [
        ("imgs/0.png", "zero"),
        (str(images / "1.png"), "one"),
        ("imgs/2.png", ""),
    ]
    assert all(s["image"].shape == (3, S, S) for s in samples)
    assert ds.skipped == 1
    assert any("imgs/missing.png" in r.getMessage() for r in caplog.records)

    manifest.write_text(json.dumps(lines[0]) + "\n" + json.dumps(lines[1]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"train\.jsonl line 3: invalid JSON"):
        ManifestDataset(manifest, ImageTransform(S))
    manifest.write_text(json.dumps(lines[0]) + "\n" + json.dumps({"caption": "no path"}) + "\n")
    with pytest.raises(ValueError, match="line 2: needs a non-empty string 'path' or 'image'"):
        ManifestDataset(manifest, ImageTransform(S))
    manifest.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="line 1: expected a JSON object"):
        ManifestDataset(manifest, ImageTransform(S))


def test_csv_manifest(tmp_path: Path) -> None:
    _manifest_images(tmp_path)
    manifest = tmp_path / "m" / "train.csv"
    manifest.write_text(
        'image,text\nimgs/0.png,"zero, with comma"\nimgs/nothere.png,x\nimgs/1.png,\n', encoding="utf-8"
    )
    ds = ManifestDataset(manifest, ImageTransform(S))
    assert [(s["key"], s["caption"]) for s in ds] == [("imgs/0.png", "zero, with comma"), ("imgs/1.png", "")]
    assert ds.skipped == 1
    manifest.write_text("path,caption\nimgs/0.png,ok\nimgs/1.png,too,many\n")
    with pytest.raises(ValueError, match=r"train\.csv line 3: expected 2 fields, got 3"):
        ManifestDataset(manifest, ImageTransform(S))
    manifest.write_text("file,caption\nimgs/0.png,ok\n")
    with pytest.raises(ValueError, match="line 1: CSV header needs a 'path' or 'image' column"):
        ManifestDataset(manifest, ImageTransform(S))


# ---------------------------------------------------------------- webdataset shards


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


def test_webdataset_shards_skip_corrupt_and_cut(shards, caplog: pytest.LogCaptureFixture) -> None:
    root, good = shards
    ds = WebDatasetShards(str(root / "shard-{000..002}.tar"), ImageTransform(S, seed=0))
    assert len(ds.urls) == 3
    with caplog.at_level(logging.WARNING, logger="binlat.data"):
        samples = list(ds)
    keys = [s["key"] for s in samples]
    assert sorted(keys) == sorted(good) and len(keys) == len(set(keys))
    captions = {s["key"]: s["caption"] for s in samples}
    assert captions["s0_2"] == "caption 2"
    assert captions["s1_0"] == "from json" and captions["s1_1"] == "text key" and captions["s1_4"] == ""
    assert all(s["image"].shape == (3, S, S) for s in samples)
    # corrupt image + missing image + the cut shard's read error + its partial sample
    assert ds.skipped == 4
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "s1_2" in logged and "s1_3" in logged and "shard-002.tar" in logged and "s2_2" in logged


def test_webdataset_url_forms_and_workers(shards) -> None:
    root, good = shards
    t = ImageTransform(S, seed=0)
    by_glob = WebDatasetShards(str(root / "shard-*.tar"), t)
    by_list = WebDatasetShards([root / "shard-000.tar", str(root / "shard-001.tar"), root / "shard-002.tar"], t)
    assert by_glob.urls == by_list.urls
    assert _keys(by_glob) == _keys(by_list)
    piped = WebDatasetShards(f"pipe:cat {root / 'shard-000.tar'}", t, allow_commands=True)
    assert sorted(_keys(piped)) == sorted(k for k in good if k.startswith("s0_"))
    with pytest.raises(ValueError, match="does not exist"):
        WebDatasetShards(str(root / "other-{0..1}.tar"), t)
    with pytest.raises(ValueError, match="matches no files"):
        WebDatasetShards(str(root / "nothing-*.tar"), t)
    # A missing shard behind a URL is an error of the stream, not a crash.
    remote_missing = WebDatasetShards(
        [f"pipe:cat {root / 'gone.tar'} 2>/dev/null", str(root / "shard-000.tar")], t, allow_commands=True
    )
    assert len(_keys(remote_missing)) == 4 and remote_missing.skipped >= 1
    # Shards split across DataLoader workers: every good sample exactly once.
    loader = DataLoader(by_glob, batch_size=3, num_workers=2, collate_fn=collate)
    keys = [k for batch in loader for k in batch["key"]]
    assert sorted(keys) == sorted(good)


# ---------------------------------------------------------------- make_dataset and collate


def test_make_dataset_dispatch(folder: Path, shards, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    shapes = make_dataset("shapes", 32, seed=5)
    assert isinstance(shapes, ShapesStream) and shapes.size == 32 and shapes.seed == 5
    with caplog.at_level(logging.WARNING, logger="binlat.data"):
        flipped = make_dataset("shapes:seed=3", 32, seed=5, hflip=True)
    assert isinstance(flipped, ShapesStream) and flipped.seed == 3
    assert any("hflip ignored" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="shapes:seed=N"):
        make_dataset("shapes:colour=red", 32)
    weighted = make_dataset("shapes:seed=4,color_attr=3,single=0", 32)
    assert weighted.seed == 4 and weighted.category_weights["color_attr"] == 3
    counts = Counter(s["scene"]["category"] for s in itertools.islice(iter(weighted), 400))
    assert counts["single"] == 0 and counts["color_attr"] > 2 * counts["colors"] > 0  # 3:1 in expectation
    for bad, message in (
        ("shapes:position=x", "position must be a number"),
        ("shapes:two=-1", "non-negative"),
        ("shapes:" + ",".join(f"{c}=0" for c in CATEGORIES), "positive sum"),
    ):
        with pytest.raises(ValueError, match=message):
            make_dataset(bad, 32)

    ds = make_dataset(str(folder), S, seed=1, random_crop=False, hflip=True)
    assert isinstance(ds, ImageFolderDataset)
    assert ds.transform.size == S and not ds.transform.random_crop and ds.transform.hflip

    images = _manifest_images(tmp_path)
    for name in ("a.jsonl", "a.csv"):
        path = images.parent / name
        path.write_text(
            json.dumps({"path": "imgs/0.png", "caption": "c"}) + "\n"
            if name.endswith("jsonl")
            else "path\nimgs/0.png\n"
        )
        assert isinstance(make_dataset(str(path), S), ManifestDataset)

    root, _ = shards
    assert isinstance(make_dataset(str(root / "shard-{000..001}.tar"), S), WebDatasetShards)
    assert isinstance(make_dataset(str(root / "shard-*.tar"), S), WebDatasetShards)

    for bad in ("no-such-thing", str(tmp_path / "missing.jsonl"), str(tmp_path / "x-{0..3}.tar"), ""):
        with pytest.raises(ValueError, match=r"expected 'shapes'.*image folder.*\.jsonl/\.csv.*\.tar"):
            make_dataset(bad, S)
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="neither a manifest nor a shard"):
        make_dataset(str(tmp_path / "file.bin"), S)


def test_collate(folder: Path) -> None:
    samples = list(ImageFolderDataset(folder, ImageTransform(S, seed=0)))[:3]
    batch = collate(samples)
    assert batch["image"].shape == (3, 3, S, S)
    assert batch["caption"] == [s["caption"] for s in samples]
    assert batch["key"] == [s["key"] for s in samples]
    stream = ShapesStream(size=32, seed=0)
    shapes_batch = collate([stream.sample(i) for i in range(2)])
    assert shapes_batch["image"].shape == (2, 3, 32, 32)
    assert len(shapes_batch["scene"]) == 2 and "key" not in shapes_batch
    with pytest.raises(ValueError, match="empty batch"):
        collate([])


def test_split_across_distributed_ranks(folder: Path, shards, monkeypatch: pytest.MonkeyPatch) -> None:
    """With torch.distributed initialised (faked: 2 ranks), ranks read disjoint parts."""
    root, good = shards
    for name in ("RANK", "WORLD_SIZE", "WORKER", "NUM_WORKERS"):
        monkeypatch.delenv(name, raising=False)
    dist = torch.distributed
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    folder_keys, shard_keys = [], []
    for rank in (0, 1):
        monkeypatch.setattr(dist, "get_rank", lambda group=None, r=rank: r)
        folder_part = _keys(ImageFolderDataset(folder, ImageTransform(S, seed=0)))
        shard_part = _keys(WebDatasetShards(str(root / "shard-{000..002}.tar"), ImageTransform(S, seed=0)))
        assert folder_part and shard_part
        folder_keys += folder_part
        shard_keys += shard_part
    assert sorted(folder_keys) == sorted(GOOD_FOLDER_KEYS)
    assert sorted(shard_keys) == sorted(good)
