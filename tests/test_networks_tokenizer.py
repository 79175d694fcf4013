"""Shapes, dtypes and behaviour of the binary tokenizer network (tiny model): bits out of encode, images of every
allowed size out of decode, thresholded and deterministic in eval, sampled with a straight-through gradient in
training; the bit regularizer; decoders without or with three upsamplings; sizes and bit shapes checked; bfloat16."""

from __future__ import annotations

import pytest
import torch

from binlat.tokenizer import BinaryTokenizer, bit_regularizer
from networks_support import bits, randomize, tiny_tokenizer_config


@pytest.fixture(scope="module")
def tokenizer() -> BinaryTokenizer:
    torch.manual_seed(0)
    return randomize(BinaryTokenizer(tiny_tokenizer_config())).eval()


# ----------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------


def test_encode_returns_bool_bits(tokenizer):
    images = torch.rand(2, 3, 16, 24) * 2 - 1
    out = tokenizer.encode(images)
    assert out.dtype == torch.bool and out.shape == (2, 4, 8)
    logits = tokenizer.encode_logits(images)
    assert torch.equal(out, torch.sigmoid(logits) > 0.5)


@pytest.mark.parametrize("size", [(16, 16), (16, 24), (32, 16), (24, 40)])
def test_decode_shapes(tokenizer, size):
    h, w = size
    out = tokenizer.decode(bits(2, 4, 8), h, w)
    assert out.shape == (2, 3, h, w) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # bool and float bits decode the same
    b = bits(1, 4, 8)
    assert torch.equal(tokenizer.decode(b.bool(), h, w), tokenizer.decode(b, h, w))


def test_decode_default_size(tokenizer):
    assert tokenizer.decode(bits(1, 4, 8)).shape == (1, 3, 16, 16)


def test_forward_eval_is_thresholded_and_deterministic(tokenizer):
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    a, b = tokenizer(images), tokenizer(images)
    assert a.reconstruction.shape == images.shape
    assert torch.equal(a.bits, b.bits) and torch.equal(a.reconstruction, b.reconstruction)
    assert torch.equal(a.bits, (torch.sigmoid(a.logits) > 0.5).float())
    assert torch.equal(a.bits.bool(), tokenizer.encode(images))
    torch.testing.assert_close(a.probs, torch.sigmoid(a.logits))
    torch.testing.assert_close(a.reconstruction, tokenizer.decode(a.bits, 16, 16), atol=1e-5, rtol=1e-5)


def test_forward_train_samples_bits_with_straight_through_gradient():
    torch.manual_seed(1)
    model = randomize(BinaryTokenizer(tiny_tokenizer_config())).train()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    torch.manual_seed(123)
    a = model(images, temperature=1000.0)  # probs all close to 1/2
    assert ((a.probs - 0.5).abs() < 0.05).all()
    assert set(a.bits.unique().tolist()) <= {0.0, 1.0}
    torch.manual_seed(456)
    b = model(images, temperature=1000.0)
    assert not torch.equal(a.bits, b.bits)
    torch.manual_seed(123)
    c = model(images, temperature=1000.0)
    assert torch.equal(a.bits, c.bits)
    # the decoder sees the sampled bits' value ...
    with torch.no_grad():
        torch.testing.assert_close(a.reconstruction, model.decode(a.bits, 16, 16), atol=1e-5, rtol=1e-5)
    # ... while the gradient flows through the probabilities into the encoder
    a.reconstruction.square().mean().backward()
    for p in (model.encoder.patch_embed.weight, model.encoder.latent_tokens, model.quantizer.to_logits.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_bit_regularizer():
    probs = torch.tensor([[0.5, 0.0], [1.0, 0.25]])
    assert bit_regularizer(probs).item() == pytest.approx((0.25 + 0 + 0 + 0.1875) / 4)
    p = torch.rand(3, 4, 5)
    torch.testing.assert_close(bit_regularizer(p), (p * (1 - p)).sum() / p.numel())


def _first_block_rows(model: BinaryTokenizer, fn) -> int:
    seen = []
    hook = model.decoder.blocks[0].register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    try:
        fn()
    finally:
        hook.remove()
    return seen[0]


def test_decode_without_upsampling():
    torch.manual_seed(2)
    model = randomize(BinaryTokenizer(tiny_tokenizer_config(upsample_after=()))).eval()
    out = model.decode(bits(2, 4, 8), 16, 24)
    assert out.shape == (2, 3, 16, 24) and torch.isfinite(out).all()
    rows = _first_block_rows(model, lambda: model.decode(bits(1, 4, 8), 16, 24))
    assert rows == 4 + 4 * 6  # full 4x6 grid from the start
    recon = model(torch.rand(1, 3, 16, 24) * 2 - 1).reconstruction
    assert recon.shape == (1, 3, 16, 24)


@pytest.mark.parametrize("scale", [None, 96])
def test_decode_three_upsamplings_on_24x24_grid(scale):
    torch.manual_seed(3)
    cfg = tiny_tokenizer_config(
        patch_size=2, decoder_layers=3, upsample_after=(0, 1, 2), downsample_after=(), rope_reference_size=scale
    )
    model = randomize(BinaryTokenizer(cfg)).eval()
    assert cfg.size_multiple == 16
    out = model.decode(bits(2, 4, 8), 48, 48)  # 24x24 patch grid
    assert out.shape == (2, 3, 48, 48) and torch.isfinite(out).all()
    # the decoder starts from grid / 2^3 = 3x3 (the release's grid / (2*3) = 4x4 would not reach 24x24)
    assert _first_block_rows(model, lambda: model.decode(bits(1, 4, 8), 48, 48)) == 4 + 3 * 3
    assert model.decode(bits(1, 4, 8), 32, 64).shape == (1, 3, 32, 64)


@pytest.mark.parametrize("size", [(65, 64), (64, 65), (0, 64), (64, 0), (4, 8), (8, 4), (12, 16), (-8, 16)])
def test_check_size_rejects_bad_sizes(tokenizer, size):
    assert tokenizer.config.size_multiple == 8
    with pytest.raises(ValueError, match="multiples of 8"):
        tokenizer.check_size(*size)
    with pytest.raises(ValueError, match="multiples of 8"):
        tokenizer.decode(bits(1, 4, 8), *size)


def test_check_size_accepts_good_sizes_and_encode_checks(tokenizer):
    for h, w in [(8, 8), (16, 8), (64, 40)]:
        tokenizer.check_size(h, w)
    with pytest.raises(ValueError, match="multiples of 8"):
        tokenizer.encode(torch.zeros(1, 3, 20, 16))
    with pytest.raises(ValueError):
        tokenizer.encode(torch.zeros(1, 1, 16, 16))  # wrong channel count


@pytest.mark.parametrize("shape", [(1, 4, 7), (1, 4, 9), (4, 8), (1, 1, 4, 8)])
def test_decode_rejects_wrong_shaped_bits(tokenizer, shape):
    with pytest.raises(ValueError, match="bits must be"):
        tokenizer.decode(torch.zeros(shape), 16, 16)


def test_tokenizer_bfloat16():
    torch.manual_seed(4)
    model = randomize(BinaryTokenizer(tiny_tokenizer_config())).eval()
    b = bits(2, 4, 8)
    ref = model.decode(b, 16, 24)
    model = model.to(torch.bfloat16)
    out = model.decode(b, 16, 24)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, atol=0.15, rtol=0.05)
    enc = model.encode(torch.rand(1, 3, 16, 16) * 2 - 1)
    assert enc.dtype == torch.bool and enc.shape == (1, 4, 8)
