import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from binlat.text import (
    DEFAULT_TEXT_ENCODER,
    TextEncoder,
    TextFeatures,
    resolve_text_encoder_path,
    text_layer_map,
)


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder(DEFAULT_TEXT_ENCODER, max_length=32)


def count_model_rows(enc: TextEncoder) -> tuple[list[int], object]:
    """Record the batch size of every model call (via a forward pre-hook)."""
    rows: list[int] = []

    def hook(module, args, kwargs):
        rows.append(kwargs["input_ids"].shape[0])

    return rows, enc.model.register_forward_pre_hook(hook, with_kwargs=True)


def test_alias_resolves_to_bundled_model() -> None:
    path = resolve_text_encoder_path(DEFAULT_TEXT_ENCODER)
    assert os.path.isfile(os.path.join(path, "config.json"))
    assert resolve_text_encoder_path("minilm") == path
    assert resolve_text_encoder_path("amd/AMD-OLMo-1B") == "amd/AMD-OLMo-1B"


def test_encoder_attributes(encoder: TextEncoder) -> None:
    assert encoder.name_or_path == DEFAULT_TEXT_ENCODER
    assert (encoder.num_layers, encoder.hidden_size, encoder.max_length) == (6, 384, 32)
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.model.training


def test_shapes_and_left_padded_mask(encoder: TextEncoder) -> None:
    feats = encoder(["a cat", "a very large red cat sitting on a mat"])
    assert feats.num_layers == 6
    n, length = feats.mask.shape
    assert n == 2 and feats.mask.dtype == torch.bool
    for h in feats.layers:
        assert h.shape == (2, length, 384) and h.dtype == torch.float32
    short = feats.mask[0]
    assert not short[0] and short[-1]
    assert feats.mask[1].all()


def test_padding_does_not_change_features(encoder: TextEncoder) -> None:
    batched = encoder(["a cat", "a very large red cat sitting on a mat"])
    alone = encoder(["a cat"])
    for hb, ha in zip(batched.layers, alone.layers):
        torch.testing.assert_close(hb[0, -1], ha[0, -1], atol=1e-4, rtol=0)


def test_duplicates_encoded_once(encoder: TextEncoder) -> None:
    rows, handle = count_model_rows(encoder)
    try:
        feats = encoder(["dog", "cat", "dog", "dog"])
    finally:
        handle.remove()
    assert rows == [2]
    assert feats.mask.shape[0] == 4
    for h in feats.layers:
        assert torch.equal(h[0], h[2]) and torch.equal(h[0], h[3])
        assert not torch.equal(h[0], h[1])


def test_truncation_warns(encoder: TextEncoder) -> None:
    with pytest.warns(UserWarning, match=r"1 prompt\(s\) exceed"):
        feats = encoder(["word " * 100, "short"])
    assert feats.mask.shape[1] == encoder.max_length


def test_empty_prompts_rejected(encoder: TextEncoder) -> None:
    with pytest.raises(ValueError):
        encoder([])


def test_missing_local_path_is_clear(tmp_path) -> None:
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(OSError, match="no_such_model.*config.json"):
        TextEncoder(missing)


def test_text_layer_map() -> None:
    assert text_layer_map(6, 6) == list(range(6))
    assert text_layer_map(6, 4) == [0, 2, 3, 5]
    assert text_layer_map(6, 1) == [5]
    ids = text_layer_map(24, 16)
    assert len(ids) == 16 and ids[0] == 0 and ids[-1] == 23
    assert all(a < b for a, b in zip(ids, ids[1:]))
    for bad in [(0, 4), (6, 0), (6.0, 4), (-1, 2)]:
        with pytest.raises(ValueError, match=r"must be an integer >= 1, got "):
            text_layer_map(*bad)


def _features(n: int, length: int, value: float) -> TextFeatures:
    layers = [torch.full((n, length, 3), value + i) for i in range(3)]
    return TextFeatures(layers, torch.ones(n, length, dtype=torch.bool))


def test_features_select_index_to() -> None:
    f = _features(4, 5, 0.0)
    f.layers[0][2] = 7.0
    sel = f.select([2, 0])
    assert sel.num_layers == 2 and torch.equal(sel.layers[0], f.layers[2])
    rows = f.index([2, 0])
    assert rows.layers[0].shape == (2, 5, 3) and (rows.layers[0][0] == 7.0).all()
    assert f.index(torch.tensor([1])).mask.shape == (1, 5)
    half = f.to(dtype=torch.float16)
    assert half.layers[0].dtype == torch.float16 and half.mask.dtype == torch.bool


def test_features_cat_left_pads() -> None:
    out = TextFeatures.cat([_features(2, 3, 1.0), _features(1, 5, 1.0)])
    assert out.mask.shape == (3, 5)
    assert out.mask[:2, :2].logical_not().all() and out.mask[:2, 2:].all() and out.mask[2].all()
    assert (out.layers[1][:2, :2] == 0).all() and (out.layers[1][:2, 2:] == 2.0).all()
    with pytest.raises(ValueError):
        TextFeatures.cat([])


def test_cached_encoder_matches_direct_and_skips_repeats(encoder: TextEncoder) -> None:
    from binlat.text.encoder import CachedTextEncoder

    cached = CachedTextEncoder(encoder, layer_ids=[5, 0])
    prompts = ["a red circle", "", "three squares to the left of a very long blue triangle", "a red circle"]
    rows, handle = count_model_rows(encoder)
    try:
        first = cached(prompts)
        again = cached(prompts[::-1])
    finally:
        handle.remove()
    assert rows == [
        1,
        1,
        1,
    ]  # three distinct prompts, each encoded alone once; the second call is served from the cache
    direct = encoder(prompts).select([5, 0])
    assert torch.equal(first.mask, direct.mask)
    for a, b in zip(first.layers, direct.layers):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    reverse = encoder(prompts[::-1]).select([5, 0])
    assert torch.equal(again.mask, reverse.mask)
    torch.testing.assert_close(again.layers[0], reverse.layers[0], atol=1e-5, rtol=1e-5)


class BatchSensitiveEncoder:
    """A stand-in language model whose output for a prompt depends on the rest of its batch, as float kernels whose
    rounding changes with the matrix shape do on some CPUs (seen on an AMD EPYC: up to 1e-6 per batch)."""

    max_length = 16

    def __call__(self, prompts: list[str]) -> TextFeatures:
        length = max(len(p) for p in prompts) + 1
        rows = []
        for p in prompts:
            row = torch.zeros(length, 2)
            row[length - len(p) - 1 :, 0] = torch.arange(len(p) + 1, dtype=torch.float32)
            row[:, 1] = 1e-6 * len(prompts) * length  # the batch's shape leaks into every row
            rows.append(row)
        h = torch.stack(rows)
        mask = torch.zeros(len(prompts), length, dtype=torch.bool)
        for i, p in enumerate(prompts):
            mask[i, length - len(p) - 1 :] = True
        return TextFeatures([h, 2 * h], mask)


def test_cached_features_do_not_depend_on_which_captions_came_first() -> None:
    """A resumed run starts with a cold cache and meets captions in other company than an uninterrupted run did;
    the features it trains on must be the same bits (exact resume on every CPU)."""
    from binlat.text.encoder import CachedTextEncoder

    warm = CachedTextEncoder(BatchSensitiveEncoder())
    warm(["a red circle", "two squares", "a blue triangle above a green circle"])
    cold = CachedTextEncoder(BatchSensitiveEncoder())
    batch = ["two squares", "a red circle"]
    a, b = warm(batch), cold(batch)
    assert torch.equal(a.mask, b.mask)
    for x, y in zip(a.layers, b.layers):
        assert torch.equal(x, y)


def test_cached_features_equal_encoding_alone(encoder: TextEncoder) -> None:
    from binlat.text.encoder import CachedTextEncoder

    cached = CachedTextEncoder(encoder)
    together = cached(["a red circle", "three squares to the left of a very long blue triangle"])
    alone = encoder(["a red circle"])
    length = int(alone.mask.sum())
    for x, y in zip(together.layers, alone.layers):
        assert torch.equal(x[0, -length:], y[0])


def test_cached_encoder_stays_bounded(encoder: TextEncoder) -> None:
    from binlat.text.encoder import CachedTextEncoder

    cached = CachedTextEncoder(encoder, max_entries=2)
    for p in ["a", "b", "c", "d", "e"]:
        cached([p])
        assert len(cached.entries) <= 2
