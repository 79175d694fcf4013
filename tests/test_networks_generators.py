"""Shapes, dtypes and behaviour of the two generator networks (tiny models): the diffusion and AR transformers in
float32 and bfloat16, padded text without influence, the number of text layers checked; the AR cache, filled token
by token or in chunks, gives the full forward's output, and too long a sequence is refused."""

from __future__ import annotations

import pytest
import torch

from binlat.generators import ARCache, ARConfig, ARTransformer, DiffusionConfig, DiffusionTransformer, GeneratorConfig
from networks_support import bits, randomize


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
