"""Real-image data, readers.py: an image folder with captions skips and counts its bad samples, crops the same
per seed and epoch, yields each good sample once across DataLoader workers, and names what is wrong with it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from binlat.data.collate import collate
from binlat.data.readers import (
    ImageFolderDataset,
)
from binlat.data.transforms import ImageTransform
from data_support import (  # noqa: F401
    BAD_FOLDER_KEYS,
    GOOD_FOLDER_KEYS,
    S,
    _keys,
    folder,
)


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
