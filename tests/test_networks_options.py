"""Network options beyond the release, off by default (the conformance cases hold the defaults to the release):
for the tokenizer, a position embedding, a pixel head, signed bits, the soft forward and the region shortcut (its
grid and pooling); for the generators, the text refiner, the 2D position grid and joint text."""

from __future__ import annotations

import pytest
import torch

from binlat.config import ConfigError, config_from_dict
from binlat.generators import ARConfig, ARTransformer, DiffusionConfig, DiffusionTransformer, GeneratorConfig
from binlat.tokenizer import BinaryTokenizer
from networks_support import bits, randomize, tiny_tokenizer_config


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
