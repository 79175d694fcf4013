"""Shapes, dtypes and behaviour of the three networks (tiny models)."""

from __future__ import annotations

import pytest
import torch

from binlat.config import ConfigError, config_from_dict
from binlat.generators import ARCache, ARConfig, ARTransformer, DiffusionConfig, DiffusionTransformer, GeneratorConfig
from binlat.tokenizer import BinaryTokenizer, TokenizerConfig, bit_regularizer


def randomize(module: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * std)
    return module


def tiny_tokenizer_config(**kw) -> TokenizerConfig:
    base = dict(
        in_channels=3,
        patch_size=4,
        num_tokens=4,
        num_bits=8,
        encoder_layers=2,
        encoder_heads=2,
        encoder_head_dim=8,
        decoder_layers=2,
        decoder_heads=2,
        decoder_head_dim=8,
        rope_axes_dims=(2, 2, 4),
        downsample_after=(0,),
        upsample_after=(0,),
        image_size=16,
    )
    base.update(kw)
    return TokenizerConfig(**base)


@pytest.fixture(scope="module")
def tokenizer() -> BinaryTokenizer:
    torch.manual_seed(0)
    return randomize(BinaryTokenizer(tiny_tokenizer_config())).eval()


def gen_config(config_class: type[GeneratorConfig], **kw) -> GeneratorConfig:
    base = dict(num_bits=8, num_tokens=6, num_layers=2, num_heads=2, head_dim=8, text_dim=12)
    base.update(kw)
    return config_class(**base)


def text_inputs(n: int = 3, length: int = 5, layers: int = 2, dim: int = 12):
    text = [torch.randn(n, length, dim) for _ in range(layers)]
    mask = torch.ones(n, length, dtype=torch.bool)
    for b in range(n):
        mask[b, : min(b * 2, length - 1)] = False  # left padding: 0, 2, 4 leading pads
    return text, mask


def bits(n: int, k: int, b: int) -> torch.Tensor:
    return torch.randint(0, 2, (n, k, b)).float()


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


# ----------------------------------------------------------------------------------------------------------
# Diffusion
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def diffusion() -> DiffusionTransformer:
    torch.manual_seed(5)
    return randomize(DiffusionTransformer(gen_config(DiffusionConfig))).eval()


def test_diffusion_shapes_float32_and_bfloat16(diffusion):
    torch.manual_seed(6)
    text, mask = text_inputs()
    x, t = bits(3, 6, 8), torch.tensor([0.9, 0.5, 0.05])
    out = diffusion(x, t, text, mask)
    assert out.shape == (3, 6, 8) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert not torch.allclose(out, diffusion(x, torch.tensor([0.1, 0.2, 0.3]), text, mask), atol=1e-4)
    bf = DiffusionTransformer(gen_config(DiffusionConfig))
    bf.load_state_dict(diffusion.state_dict())
    bf = bf.to(torch.bfloat16).eval()
    out_bf = bf(x.bool(), t, text, mask)
    assert out_bf.shape == (3, 6, 8) and out_bf.dtype == torch.bfloat16 and torch.isfinite(out_bf).all()
    torch.testing.assert_close(out_bf.float(), out, atol=0.1 * max(1.0, out.abs().max().item()), rtol=0.05)


def test_diffusion_padded_text_has_no_influence(diffusion):
    torch.manual_seed(7)
    text, mask = text_inputs()
    x, t = bits(3, 6, 8), torch.rand(3)
    out = diffusion(x, t, text, mask)
    noisy = [torch.where(mask[..., None], s, torch.randn_like(s) * 100) for s in text]
    torch.testing.assert_close(diffusion(x, t, noisy, mask), out, atol=1e-6, rtol=0)
    changed = [s.clone() for s in text]
    changed[1][:, -1] += 3.0  # a valid position in every row
    assert not torch.allclose(diffusion(x, t, changed, mask), out, atol=1e-4)


def test_diffusion_wrong_number_of_text_layers(diffusion):
    text, mask = text_inputs(layers=3)
    with pytest.raises(ValueError, match="text layers"):
        diffusion(bits(3, 6, 8), torch.rand(3), text, mask)
    with pytest.raises(ValueError, match="text layers"):
        diffusion(bits(3, 6, 8), torch.rand(3), text[:1], mask)


# ----------------------------------------------------------------------------------------------------------
# AR
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ar() -> ARTransformer:
    torch.manual_seed(8)
    return randomize(ARTransformer(gen_config(ARConfig))).eval()


def test_ar_shapes_float32_and_bfloat16(ar):
    torch.manual_seed(9)
    text, mask = text_inputs()
    first = ar(None, text, mask)
    assert first.shape == (3, 1, 8) and first.dtype == torch.float32
    prefix = bits(3, 5, 8)
    out = ar(prefix, text, mask)
    assert out.shape == (3, 6, 8) and torch.isfinite(out).all()
    torch.testing.assert_close(out[:, :1], first, atol=1e-5, rtol=1e-5)
    # causal: row i does not depend on bits of tokens >= i
    prefix2 = prefix.clone()
    prefix2[:, 3:] = 1 - prefix2[:, 3:]
    out2 = ar(prefix2, text, mask)
    torch.testing.assert_close(out2[:, :4], out[:, :4], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out2[:, 4:], out[:, 4:], atol=1e-4)
    bf = ARTransformer(gen_config(ARConfig))
    bf.load_state_dict(ar.state_dict())
    bf = bf.to(torch.bfloat16).eval()
    out_bf = bf(prefix, text, mask)
    assert out_bf.dtype == torch.bfloat16 and out_bf.shape == (3, 6, 8) and torch.isfinite(out_bf).all()
    torch.testing.assert_close(out_bf.float(), out, atol=0.1 * max(1.0, out.abs().max().item()), rtol=0.05)


def test_ar_cache_incremental_matches_full(ar):
    torch.manual_seed(10)
    text, mask = text_inputs()
    prefix = bits(3, 5, 8)
    full = ar(prefix, text, mask)
    cache = ar.new_cache()
    assert isinstance(cache, ARCache)
    rows = [ar(None, text, mask, cache=cache)]
    assert cache.length == 1
    for i in range(5):
        rows.append(ar(prefix[:, i : i + 1], text, mask, cache=cache))
    assert cache.length == 6
    inc = torch.cat(rows, dim=1)
    assert inc.shape == full.shape
    torch.testing.assert_close(inc, full, atol=1e-5, rtol=0)


def test_ar_cache_chunked_matches_full(ar):
    torch.manual_seed(11)
    text, mask = text_inputs()
    prefix = bits(3, 5, 8)
    full = ar(prefix, text, mask)
    cache = ar.new_cache()
    a = ar(prefix[:, :2], text, mask, cache=cache)  # start + 2 tokens on the first call
    b = ar(prefix[:, 2:], text, mask, cache=cache)
    torch.testing.assert_close(torch.cat((a, b), dim=1), full, atol=1e-5, rtol=0)


def test_ar_rejects_too_long_sequences(ar):
    text, mask = text_inputs()
    n = ar.config.num_tokens
    with pytest.raises(ValueError, match="longer"):
        ar(bits(3, n + 1, 8), text, mask)
    cache = ar.new_cache()
    ar(bits(3, n, 8), text, mask, cache=cache)
    with pytest.raises(ValueError, match="longer"):
        ar(bits(3, 1, 8), text, mask, cache=cache)


def test_ar_padded_text_has_no_influence(ar):
    torch.manual_seed(12)
    text, mask = text_inputs()
    prefix = bits(3, 5, 8)
    out = ar(prefix, text, mask)
    noisy = [torch.where(mask[..., None], s, torch.randn_like(s) * 100) for s in text]
    torch.testing.assert_close(ar(prefix, noisy, mask), out, atol=1e-6, rtol=0)
    changed = [s.clone() for s in text]
    changed[0][:, -1] += 3.0
    assert not torch.allclose(ar(prefix, changed, mask), out, atol=1e-4)


def test_ar_wrong_number_of_text_layers(ar):
    text, mask = text_inputs(layers=1)
    with pytest.raises(ValueError, match="text layers"):
        ar(None, text, mask)


# --- options beyond the release (off by default: the conformance cases hold the defaults to the release) ----------
def test_release_defaults_build_no_extra_parameters():
    names = set(BinaryTokenizer(tiny_tokenizer_config()).state_dict())
    assert not any("pos_embed" in n or "pixel_conv" in n for n in names)


def test_position_embedding_makes_identical_decoder_queries_differ():
    """Without it every mask token is the same vector (position only via RoPE); with it the decoder's patches
    differ even when attention reads nothing yet (here: attention and MLPs zeroed)."""

    def patch_spread(abs_pos_embed: bool) -> float:
        torch.manual_seed(0)
        model = BinaryTokenizer(tiny_tokenizer_config(abs_pos_embed=abs_pos_embed, upsample_after=())).eval()
        with torch.no_grad():
            for block in model.decoder.blocks:
                for p in block.parameters():
                    p.zero_()
        with torch.no_grad():
            out = model.decode(bits(1, 4, 8), 16, 16)
        patches = out.unfold(2, 4, 4).unfold(3, 4, 4).reshape(3, 16, 16)
        return float(patches.std(dim=1).max())

    assert patch_spread(False) < 1e-6 < patch_spread(True)


@pytest.mark.parametrize("size", [(16, 16), (32, 24)])
def test_position_embedding_and_pixel_head_at_any_size(size):
    torch.manual_seed(1)
    model = randomize(BinaryTokenizer(tiny_tokenizer_config(abs_pos_embed=True, pixel_head_channels=5))).eval()
    assert model.decoder.last_layer is model.decoder.pixel_conv
    out = model.decode(bits(2, 4, 8), *size)
    assert out.shape == (2, 3, *size) and torch.isfinite(out).all()
    assert model(torch.rand(1, 3, *size) * 2 - 1).reconstruction.shape == (1, 3, *size)


def test_signed_bits_embed_as_plus_minus_one():
    torch.manual_seed(2)
    plain = BinaryTokenizer(tiny_tokenizer_config())
    signed = BinaryTokenizer(tiny_tokenizer_config(signed_bits=True))
    signed.load_state_dict(plain.state_dict())
    b = bits(3, 4, 8).float()
    torch.testing.assert_close(signed.quantizer.embed(b), plain.quantizer.embed(2 * b - 1))
    assert not torch.allclose(signed.quantizer.embed(b), plain.quantizer.embed(b))


def test_soft_forward_decodes_the_probabilities():
    torch.manual_seed(3)
    model = randomize(BinaryTokenizer(tiny_tokenizer_config())).train()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    out = model(images, soft=True)
    probs = torch.sigmoid(model.encode_logits(images).float())
    torch.testing.assert_close(out.probs, probs)
    assert torch.equal(out.bits, (probs > 0.5).float())
    expected = model._decode_latent(model.quantizer.embed(probs), 16, 16)
    torch.testing.assert_close(out.reconstruction, expected)
    out.reconstruction.square().mean().backward()
    assert model.encoder.patch_embed.weight.grad.abs().sum() > 0  # the gradient reaches the encoder
    assert not torch.equal(model.eval()(images).reconstruction, out.reconstruction.detach())


def test_region_grid_follows_the_image_aspect():
    from binlat.tokenizer.model import region_grid

    assert region_grid(32, 8, 8) == (4, 8)
    assert region_grid(128, 32, 32) == (8, 16)
    assert region_grid(16, 4, 4) == (4, 4)
    assert region_grid(6, 2, 6) == (1, 6)
    assert region_grid(7, 5, 5) == (1, 7)  # a prime count: one row of regions


def test_region_pool_and_unpool():
    from binlat.tokenizer.model import pool_regions, unpool_regions

    grid = torch.arange(16.0).reshape(1, 1, 4, 4)
    pooled = pool_regions(grid, 4)  # 2x2 regions of 2x2 cells
    assert pooled.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    spread = unpool_regions(pooled, 4, 4).reshape(4, 4)
    assert spread[0, :2].tolist() == [2.5, 2.5] and spread[3, 3] == 12.5
    tokens = torch.randn(2, 8, 3)
    assert unpool_regions(tokens, 6, 10).shape == (2, 60, 3)


@pytest.mark.parametrize("size", [(16, 16), (32, 48)])
def test_region_shortcut_carries_position_through_the_latent(size):
    """With the shortcut, a latent token depends most on its own region from the first step: changing one corner of
    the image moves that corner's token more than the opposite one."""
    torch.manual_seed(4)
    model = BinaryTokenizer(tiny_tokenizer_config(region_shortcut=True, encoder_layers=1)).eval()
    images = torch.zeros(1, 3, *size)
    changed = images.clone()
    changed[..., : size[0] // 2, : size[1] // 2] = 1.0
    with torch.no_grad():
        delta = (model.encoder(changed, None) - model.encoder(images, None)).norm(dim=-1)[0]
    assert delta[0] > delta[-1]
    out = model.decode(bits(1, 4, 8), *size)
    assert out.shape == (1, 3, *size) and torch.isfinite(out).all()


def test_text_refiner_reads_word_order_and_keeps_the_ar_cache_exact() -> None:
    """model.text_refiner_layers: the image rows read word order through the refiner (without it, text keys have
    no position: swapping two tokens changes nothing, the bag-of-words reading behind the relation reversals),
    padding changes nothing, and the AR generator's cached decoding still equals its full forward."""
    c = dict(num_bits=16, num_tokens=8, num_layers=2, num_heads=2, head_dim=16, text_dim=24, text_refiner_layers=2)
    torch.manual_seed(0)
    diffusion, ar = DiffusionTransformer(DiffusionConfig(**c)).eval(), ARTransformer(ARConfig(**c)).eval()
    assert not diffusion.text_refiner.proj_out.weight.any()  # a new refiner starts silent, as a network without one
    plain = DiffusionTransformer(DiffusionConfig(**{**c, "text_refiner_layers": 0})).eval()
    assert plain.text_refiner is None
    with torch.no_grad():  # off the zero-initialised gates, so the text reaches the output
        for p in [*diffusion.parameters(), *plain.parameters(), *ar.parameters()]:
            if not p.any():
                p.normal_(0, 0.5)
        diffusion.text_refiner.proj_out.weight.zero_()
    # a silent refiner opens on its first step once the network reads text: the zero projection's gradient is a
    # full-rank outer product (a per-channel gate's was one number per channel, and stayed shut in probe A1)
    diffusion(
        torch.rand(3, 8, 16).round(), torch.rand(3), [torch.randn(3, 5, 24)] * 2, torch.ones(3, 5, dtype=torch.bool)
    ).square().sum().backward()
    assert torch.linalg.matrix_rank(diffusion.text_refiner.proj_out.weight.grad) > 1
    with torch.no_grad():
        torch.nn.init.eye_(diffusion.text_refiner.proj_out.weight)
        torch.nn.init.eye_(ar.text_refiner.proj_out.weight)
    words = torch.randn(2, 5, 24)
    text, mask = [words, words], torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    x, t = (torch.rand(2, 8, 16) < 0.5).float(), torch.full((2,), 0.5)
    with torch.no_grad():
        out = diffusion(x, t, text, mask)
        swapped = words[:, [1, 0, 2, 3, 4]]  # the same tokens, two of them in the other order
        refined = diffusion.text_refiner(words, mask)
        assert (diffusion.text_refiner(swapped, mask)[:, 2:4] - refined[:, 2:4]).abs().max() > 1e-1  # not the swapped
        assert (diffusion(x, t, [swapped, swapped], mask) - out).abs().max() > 1e-3
        torch.testing.assert_close(plain(x, t, [swapped, swapped], mask), plain(x, t, text, mask), atol=1e-6, rtol=0)
        padded = [torch.cat((w, torch.randn(2, 3, 24)), 1) for w in text]
        longer = torch.cat((mask, torch.zeros(2, 3, dtype=torch.bool)), 1)
        torch.testing.assert_close(diffusion(x, t, padded, longer), out, atol=1e-6, rtol=0)
        full = ar(x, text, mask)
        cache = ar.new_cache()
        steps = [ar(None, text, mask, cache)] + [ar(x[:, i : i + 1], text, mask, cache) for i in range(8)]
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)


def test_position_grid_starts_the_generators_positions_from_a_2d_table(tmp_path) -> None:
    """model.position_grid: token k sits at (k // cols, k % cols); tokens of one row share the row half of the table,
    tokens of one column the column half; the AR start row is zero; a grid that is not the token count is refused;
    the option survives save/load."""
    shared = dict(num_bits=16, num_tokens=12, num_layers=1, num_heads=2, head_dim=8, text_dim=8, position_grid=[3, 4])
    c = DiffusionConfig(**shared)
    table = DiffusionTransformer(c).blocks[0].pos_emb.detach()[0]
    half = c.dim // 2
    assert torch.equal(table[4, :half], table[7, :half]) and not torch.equal(table[4, half:], table[7, half:])
    assert torch.equal(table[1, half:], table[9, half:]) and not torch.equal(table[1, :half], table[9, :half])
    ar_table = ARTransformer(ARConfig(**shared)).blocks[0].pos_emb.detach()[0]
    assert not ar_table[0].any() and torch.equal(ar_table[1:], table)
    with pytest.raises(ValueError, match="rows x cols = num_tokens"):
        DiffusionTransformer(DiffusionConfig(num_tokens=12, num_layers=1, position_grid=[3, 3]))
    with pytest.raises(ValueError, match="positive integers"):
        GeneratorConfig(num_tokens=12, position_grid=[12])  # the shared fields' checks
    DiffusionTransformer(c).save_pretrained(tmp_path / "d")
    assert DiffusionTransformer.from_pretrained(tmp_path / "d").config.position_grid == (3, 4)


def test_joint_text_starts_as_the_plain_network_and_lets_the_text_read_the_image() -> None:
    """model.joint_text: the text rows are queries too and carry a stream from block to block. A new network equals
    the release's (the stream enters through a zero projection); once that opens, what block 2 reads of the text
    depends on the image (the plain network's text keys never do); padding changes nothing; the AR kind refuses it."""
    c = DiffusionConfig(num_bits=16, num_tokens=8, num_layers=2, num_heads=2, head_dim=16, text_dim=24, joint_text=True)
    torch.manual_seed(0)
    joint = DiffusionTransformer(c).eval()
    plain = DiffusionTransformer(DiffusionConfig(**{**c.__dict__, "joint_text": False})).eval()
    with torch.no_grad():
        for name, p in joint.named_parameters():  # off the zero initialisations, so every path reaches the output
            if not p.any() and "text_update" not in name:
                p.normal_(0, 0.5)
    plain.load_state_dict({k: v for k, v in joint.state_dict().items() if "text_update" not in k})
    words = torch.randn(2, 5, 24)
    text, mask = [words, words], torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    x, t = (torch.rand(2, 8, 16) < 0.5).float(), torch.full((2,), 0.5)
    with torch.no_grad():
        torch.testing.assert_close(joint(x, t, text, mask), plain(x, t, text, mask), atol=1e-5, rtol=0)
        for block in joint.blocks:
            block.text_update.weight.normal_(0, 0.5)
        out = joint(x, t, text, mask)
        assert (out - plain(x, t, text, mask)).abs().max() > 1e-2
        # the image's effect on the output through the text stream: change only sample 0's image
        other = x.clone()
        other[0] = 1 - other[0]
        plain_gap = (plain(other, t, text, mask) - plain(x, t, text, mask))[1].abs().max()
        assert plain_gap == 0 and (joint(other, t, text, mask) - out)[1].abs().max() == 0  # samples stay apart
        temb = joint.t_embed(t)
        _, stream = joint.blocks[0](joint.x_embed(x), temb, words, mask)
        _, stream_other = joint.blocks[0](joint.x_embed(other), temb, words, mask)
        assert (stream_other - stream)[0].abs().max() > 1e-2 and (stream_other - stream)[1].abs().max() == 0
        padded = [torch.cat((w, torch.randn(2, 3, 24)), 1) for w in text]
        longer = torch.cat((mask, torch.zeros(2, 3, dtype=torch.bool)), 1)
        torch.testing.assert_close(joint(x, t, padded, longer), out, atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="joint_text is the diffusion generator's option"):
        config_from_dict(ARConfig, {"joint_text": True})
