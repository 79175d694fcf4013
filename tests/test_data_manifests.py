"""Real-image data, readers.py: JSONL and CSV manifests of images and captions."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from binlat.data.readers import (
    ManifestDataset,
)
from binlat.data.transforms import ImageTransform
from data_support import (
    S,
    _manifest_images,
)


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
