"""Real-image data, readers.py: WebDataset shards skip corrupt and cut samples, and take every URL form, across
DataLoader workers."""

from __future__ import annotations

import logging

import pytest
from torch.utils.data import DataLoader

from binlat.data.collate import collate
from binlat.data.readers import (
    WebDatasetShards,
)
from binlat.data.transforms import ImageTransform
from data_support import (  # noqa: F401
    S,
    _keys,
    shards,
)


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
