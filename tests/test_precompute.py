"""binlat precompute: shards of bits (+ text features) that generator training reads instead of images."""

import json

import pytest
import torch

from binlat.data.precomputed import PrecomputedDataset, precompute
from binlat.data.shapes import ShapesStream
from binlat.text import TextEncoder
from binlat.tokenizer import BinaryTokenizer, TokenizerConfig


@pytest.fixture(scope="module")
def tokenizer():
    torch.manual_seed(0)
    cfg = TokenizerConfig(
        patch_size=8,
        num_tokens=8,
        num_bits=12,
        encoder_layers=1,
        encoder_heads=2,
        encoder_head_dim=16,
        decoder_layers=1,
        decoder_heads=2,
        decoder_head_dim=16,
        rope_axes_dims=(4, 6, 6),
        downsample_after=(),
        upsample_after=(),
        image_size=64,
    )
    return BinaryTokenizer(cfg).eval()


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder(max_length=16)


def test_bits_and_captions_round_trip(tokenizer, tmp_path):
    data = ShapesStream(size=64, seed=3)
    n = precompute(data, tokenizer, tmp_path, shard_size=4, batch_size=3, max_samples=10, progress=False)
    assert n == 10
    assert sorted(p.name for p in tmp_path.glob("shard-*")) == [f"shard-0000{i}.safetensors" for i in range(3)]
    ds = PrecomputedDataset(tmp_path)
    assert len(ds) == 10 and not ds.has_text
    for i in (0, 3, 4, 9):  # across shard boundaries, including the short last shard
        ref = data.sample(i)
        got = ds.sample(i)
        assert got["caption"] == ref["caption"]
        assert torch.equal(got["bits"], tokenizer.encode(ref["image"][None])[0].to(torch.uint8))
    with pytest.raises(IndexError):
        ds.sample(10)


def test_text_features_match_the_encoder(tokenizer, encoder, tmp_path):
    data = ShapesStream(size=64, seed=4)
    precompute(
        data,
        tokenizer,
        tmp_path,
        text_encoder=encoder,
        text_layers=[1, 4],
        shard_size=5,
        batch_size=4,
        max_samples=6,
        progress=False,
    )
    ds = PrecomputedDataset(tmp_path)
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["text_layers"] == [1, 4] and index["text_max_length"] == 16
    s = ds.sample(5)
    caption = data.sample(5)["caption"]
    feats = encoder([caption]).select([1, 4])
    length = int(feats.mask.sum())
    assert s["text"].shape == (2, 16, encoder.hidden_size) and s["text_mask"].shape == (16,)
    assert s["text_mask"][-length:].all() and not s["text_mask"][:-length].any()  # left padded
    for layer in range(2):
        torch.testing.assert_close(
            s["text"][layer, -length:].float(), feats.layers[layer][0, -length:], atol=2e-3, rtol=2e-3
        )  # stored as float16
    uncond = ds.uncond()
    assert uncond["text"].shape == (1, 2, 16, encoder.hidden_size)


def test_endless_data_needs_a_limit_and_missing_folder_is_explained(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="max_samples"):
        precompute(ShapesStream(size=64), tokenizer, tmp_path, progress=False)
    # 0, which means "all" for a finite dataset, is the same refusal here (it was a TypeError from len())
    with pytest.raises(ValueError, match="max_samples"):
        precompute(ShapesStream(size=64), tokenizer, tmp_path, max_samples=0, progress=False)
    with pytest.raises(ValueError, match="binlat precompute"):
        PrecomputedDataset(tmp_path / "nothing")


def test_generator_trains_on_precomputed_bits_of_its_own_tokenizer_only(tokenizer, tmp_path):
    from binlat.config import config_from_dict
    from binlat.data.readers import make_dataset
    from binlat.train.config import TrainConfig
    from binlat.train.engine import Trainer

    tokenizer.save_pretrained(tmp_path / "tok")
    own = BinaryTokenizer.from_pretrained(tmp_path / "tok")
    precompute(
        make_dataset("shapes", size=64, seed=0),
        own,
        tmp_path / "bits",
        shard_size=8,
        max_samples=16,
        tokenizer_ref=str(tmp_path / "tok"),
        data_spec="shapes",
        progress=False,
    )
    index = json.loads((tmp_path / "bits" / "index.json").read_text())
    assert index["data"] == "shapes" and len(index["tokenizer_sha256"]) == 64

    def run(tok_dir, name, **generator):
        d = {
            "kind": "diffusion",
            "model": {"num_layers": 1, "num_heads": 2, "head_dim": 16},
            "batch_size": 4,
            "max_steps": 2,
            "warmup_steps": 1,
            "save_every": 2,
            "log_every": 1,
            "sample_every": 2,
            "trackers": [],
            "data": f"precomputed:{tmp_path / 'bits'}",
            "generator": {"tokenizer": str(tok_dir), "sample_steps": 2, "prediction": "x0", **generator},
        }
        Trainer(config_from_dict(TrainConfig, d), tmp_path / name).train()
        return [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    rows = run(tmp_path / "tok", "run")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    # made from shapes: the run keeps its running benchmark score, as on the live stream
    assert [r["step"] for r in rows if "eval_shapes_accuracy" in r] == [2]
    with pytest.raises(ValueError, match="repa_weight aligns to the tokenizer's features of the images.*holds bits"):
        run(tmp_path / "tok", "repa", repa_weight=1.0)  # REPA needs the images, which bits do not keep
    assert not (tmp_path / "repa").exists()
    torch.manual_seed(1)
    BinaryTokenizer(tokenizer.config).save_pretrained(tmp_path / "other")  # same shape, other weights
    with pytest.raises(ValueError, match="bits of another tokenizer.*precompute again"):
        run(tmp_path / "other", "wrong")
