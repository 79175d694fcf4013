"""Real-image data: make_dataset picks the reader a name asks for (the shapes stream, a folder, a manifest,
shards), collate batches samples, and the readers split their samples across distributed ranks."""

from __future__ import annotations

import itertools
import json
import logging
from collections import Counter
from pathlib import Path

import pytest
import torch

from binlat.data.collate import collate
from binlat.data.readers import (
    ImageFolderDataset,
    ManifestDataset,
    WebDatasetShards,
    make_dataset,
)
from binlat.data.shapes import CATEGORIES, ShapesStream, other_way, swap_roles
from binlat.data.transforms import ImageTransform
from data_support import (  # noqa: F401
    GOOD_FOLDER_KEYS,
    S,
    _keys,
    _manifest_images,
    folder,
    shards,
)


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


def test_shapes_spec_pairing_switches() -> None:
    """both_ways=1 and role_pairs=1 make sample 2k+1 of a position scene 2k its partner (the same picture said the
    other way round; the roles swapped and the places exchanged); off by default and at 0; other values, the key
    without a value, and both at 1 are errors that say what they do."""
    for bad, message in (
        ("shapes:both_ways=yes", "both_ways must be 0 or 1"),
        ("shapes:both_ways=0.5", "both_ways must be 0 or 1"),
        ("shapes:role_pairs=2", r"role_pairs must be 0 or 1 \(1: each position scene followed by its roles swapped"),
        ("shapes:both_ways", "'both_ways=1', 'role_pairs=1' or 'above_left=0.8'"),
        ("shapes:role_pairs=1,both_ways=1", "both_ways and role_pairs .* cannot both be on"),
    ):
        with pytest.raises(ValueError, match=message):
            make_dataset(bad, 32)
    off = (make_dataset("shapes", 32), make_dataset("shapes:position=2", 32))
    off += (make_dataset("shapes:both_ways=0,role_pairs=0", 32),)
    assert not any(ds.both_ways or ds.role_pairs for ds in off)
    alone = make_dataset("shapes:seed=4,position=5", 32)
    for switch, turn in (("both_ways", other_way), ("role_pairs", swap_roles)):
        paired = make_dataset(f"shapes:seed=4,{switch}=1,position=5", 32)
        assert getattr(paired, switch) and not (paired.both_ways and paired.role_pairs)
        assert paired.seed == 4 and paired.category_weights == alone.category_weights
        samples = [paired.sample(i) for i in range(24)]
        partners = [i for i in range(1, 24, 2) if samples[i - 1]["scene"]["category"] == "position"]
        assert partners and all(samples[i]["caption"] == turn(samples[i - 1]["caption"]) for i in partners)
        assert all(samples[i]["caption"] == alone.sample(i)["caption"] for i in range(24) if i not in partners)
        same_picture = [torch.equal(samples[i]["image"], samples[i - 1]["image"]) for i in partners]
        assert all(same_picture) if switch == "both_ways" else not any(same_picture)


def test_shapes_spec_above_left() -> None:
    """above_left=P reaches the stream as a share of the position captions; a value that is no number, or no
    share, is an error that names it."""
    assert make_dataset("shapes", 32).above_left is None
    assert make_dataset("shapes:position=2,above_left=0.8", 32).above_left == 0.8
    with pytest.raises(ValueError, match="above_left must be a number"):
        make_dataset("shapes:above_left=most", 32)
    with pytest.raises(ValueError, match=r"above_left .* must lie in \[0, 1\]"):
        make_dataset("shapes:above_left=2", 32)
    staged = make_dataset("shapes:above_left=1,above_left_until=64,above_left_after=0.75", 32)
    assert (staged.above_left, staged.above_left_until, staged.above_left_after) == (1.0, 64, 0.75)
    with pytest.raises(ValueError, match="above_left_until must be an integer"):
        make_dataset("shapes:above_left=1,above_left_until=1e3", 32)
    with pytest.raises(ValueError, match="ends the above_left share and needs one"):
        make_dataset("shapes:above_left_until=64", 32)


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


def test_shapes_spec_of_equal_weights_warns_it_is_the_uniform_mix(caplog) -> None:
    """'shapes:position=1' keeps the other categories at weight 1: the uniform mix, not position captions only (a
    reading that once mislabelled seven probes); the warning names the spelling that means only those named."""
    with caplog.at_level(logging.WARNING, logger="binlat.data.readers"):
        uniform = make_dataset("shapes:position=1", 32)
    assert uniform.category_weights == {c: 1.0 for c in CATEGORIES}
    only = "shapes:" + ",".join(f"{c}={int(c == 'position')}" for c in CATEGORIES)
    assert "uniform mix" in caplog.text and repr(only) in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="binlat.data.readers"):
        scenes = make_dataset(only, 32)
        make_dataset("shapes:position=2", 32)
    assert caplog.text == ""
    assert {scenes.sample(i)["scene"]["category"] for i in range(20)} == {"position"}


def test_a_runs_data_line_gives_the_shapes_category_shares() -> None:
    """The line a run prints before step 1 names the categories' shares, so 'shapes:position=1' shows itself the
    uniform mix on the terminal (the warning goes to the run's log)."""
    from binlat.train.data import describe_data

    uniform, _ = describe_data(make_dataset("shapes:position=1", 32), "shapes:position=1", 32)
    assert "categories drawn: single 17 %, colors 17 %" in uniform and "position 17 %" in uniform
    only = "shapes:" + ",".join(f"{c}={int(c == 'position')}" for c in CATEGORIES)
    line, _ = describe_data(make_dataset(only, 32), only, 32)
    assert "categories drawn: position 100 %;" in line
