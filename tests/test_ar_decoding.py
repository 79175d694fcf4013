"""AR decoding modes: the default static-buffer step gives today's bits and logits exactly; the fixed-shape step
that torch.compile traces agrees to float tolerance (so it stays opt in); the reference mode is unchanged.

"appending" is the growing-cache path the cache was first built as (forward(..., cache) on a KVCache): the
default "static" mode must equal it bit for bit, for both kinds of guidance, several seeds, batch 1 and 4, and the
prefix path editing uses."""

from __future__ import annotations

import inspect

import pytest
import torch

import binlat.processes.ar as ar_mod
from binlat.generators import ARConfig, ARTransformer
from binlat.nn import StaticKVCache
from binlat.processes import ARDecoding
from binlat.processes.ar import ARSampling
from binlat.processes.common import make_generators
from binlat.text import TextFeatures

CFG = ARConfig(num_bits=16, num_tokens=12, num_layers=3, num_heads=2, head_dim=8, text_dim=12)


@pytest.fixture(scope="module")
def net() -> ARTransformer:
    torch.manual_seed(0)
    model = ARTransformer(CFG)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def text(lengths: list[int], seed: int) -> TextFeatures:
    g = torch.Generator().manual_seed(seed)
    n, length = len(lengths), max(lengths)
    mask = torch.zeros(n, length, dtype=torch.bool)
    for i, k in enumerate(lengths):
        mask[i, length - k :] = True
    return TextFeatures([torch.randn(n, length, CFG.text_dim, generator=g) for _ in range(CFG.num_layers)], mask)


def sample(net, decode: str, seeds, guidance: float, prefix=None, use_cache: bool = True):
    cond = text([3, 5, 2, 4, 1][: len(seeds)], 0)
    uncond = text([2], 9)
    return ARDecoding(use_cache=use_cache, decode=decode).sample(
        net,
        cond,
        uncond,
        make_generators(seeds),
        guidance_scale=guidance,
        temperature=1.0,
        prefix=prefix,
        return_logits=True,
    )


@pytest.mark.parametrize("guidance", [0.0, 4.0], ids=["no_guidance", "classifier_free"])
@pytest.mark.parametrize("seeds", [[0], [5], [11], [1, 2, 3, 4], [7, 8, 9, 10]])
@pytest.mark.parametrize("prefix_len", [0, 3])
def test_static_decoding_gives_todays_bits_and_logits_exactly(net, guidance, seeds, prefix_len):
    prefix = None
    if prefix_len:
        g = torch.Generator().manual_seed(sum(seeds))
        prefix = (torch.rand(len(seeds), prefix_len, CFG.num_bits, generator=g) < 0.5).float()
    bits, logits = sample(net, "static", seeds, guidance, prefix)
    ref_bits, ref_logits = sample(net, "appending", seeds, guidance, prefix)
    assert torch.equal(bits, ref_bits)
    assert len(logits) == len(ref_logits) == CFG.num_tokens - prefix_len
    assert all(torch.equal(a, b) for a, b in zip(logits, ref_logits))
    # and the release's algorithm (full recomputation) still gives the same bits
    slow_bits, _ = sample(net, "static", seeds, guidance, prefix, use_cache=False)
    assert torch.equal(bits, slow_bits)


def test_static_is_the_default():
    assert ARDecoding().decode == "static" and ARDecoding().use_cache
    with pytest.raises(ValueError, match="decode must be one of"):
        ARDecoding(decode="fast")


def test_continuation_through_static_decoding_equals_appending(net):
    cond, uncond = text([4, 2], 1), text([2], 9)
    prefix = (torch.rand(2, 5, CFG.num_bits, generator=torch.Generator().manual_seed(2)) < 0.5).float()
    out = {
        mode: ARDecoding(decode=mode).continue_from(
            net, prefix, cond, uncond, make_generators([3, 4]), ARSampling(guidance_scale=2.0)
        )
        for mode in ("static", "appending")
    }
    assert torch.equal(out["static"], out["appending"]) and torch.equal(out["static"][:, :5], prefix)


def test_editing_continuation_and_generation_keep_their_bits(monkeypatch):
    """binlat.editing.continue_ar and Pipeline generation with the AR generator: the default decoding gives the
    bits the growing cache gave (ARDecoding's default switched to "appending" for the reference run)."""
    from PIL import Image, ImageDraw

    from binlat import editing
    from binlat.pipeline import Pipeline

    pipe = Pipeline.random_tiny()
    image = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(image).ellipse((10, 10, 50, 50), fill=(220, 30, 30))

    def run():
        edited = editing.continue_ar(pipe, image, "a red circle", keep_tokens=5, seed=3, num_images=2)
        made = pipe(["a red circle", "two squares"], kind="ar", seed=1, return_bits=True)
        return edited.bits, made.bits

    ours = run()
    defaults = tuple(
        "appending" if name == "decode" else p.default
        for name, p in inspect.signature(ARDecoding).parameters.items()
        if p.default is not p.empty
    )
    monkeypatch.setattr(ARDecoding.__init__, "__defaults__", defaults)
    assert ARDecoding().decode == "appending"
    theirs = run()
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


@pytest.mark.parametrize("guidance", [0.0, 4.0])
def test_fixed_shape_step_agrees_to_float_tolerance(net, monkeypatch, guidance):
    """decode='compiled' runs ARTransformer.static_step through torch.compile; here the same function runs
    uncompiled (compiling takes tens of seconds): whole-buffer attention with a mask, shapes fixed."""
    monkeypatch.setattr(ar_mod, "_compiled_step", lambda network: network.static_step)
    bits, logits = sample(net, "compiled", [1, 2, 3, 4], guidance)
    ref_bits, ref_logits = sample(net, "static", [1, 2, 3, 4], guidance)
    for a, b in zip(logits, ref_logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert torch.equal(bits, ref_bits)  # a flip would need a uniform within ~1e-6 of a probability


def test_fixed_shape_step_traces_as_one_graph(net):
    """What decode='compiled' relies on: static_step traces whole, no graph break (the eager backend checks the trace
    without generating kernels), and over the cache's own inputs it keeps agreeing with decode_step."""
    cond = text([3, 5], 0)
    step = torch.compile(net.static_step, backend="eager", fullgraph=True, dynamic=False)
    caches = [net.new_cache(2, cond.mask.shape[1]) for _ in range(2)]
    row = (torch.rand(2, 1, CFG.num_bits, generator=torch.Generator().manual_seed(4)) < 0.5).float()
    with torch.no_grad():
        for cache in caches:
            net(None, cond.layers, cond.mask, cache)
        fixed, static = caches
        for _ in range(3):
            out = step(row, *fixed.static_step_inputs())
            fixed.advance()
            torch.testing.assert_close(out, net.decode_step(row, static), atol=1e-4, rtol=0)
    assert fixed.length == static.length and [a.length for a in fixed.layers] == [b.length for b in static.layers]


def test_static_cache_preallocates_and_never_grows(net):
    cond = text([3, 5], 0)
    cache = net.new_cache(2, cond.mask.shape[1])
    buffers = [(layer.k_buffer.data_ptr(), layer.v_buffer.data_ptr()) for layer in cache.layers]
    assert all(isinstance(layer, StaticKVCache) for layer in cache.layers)
    assert cache.layers[0].capacity == cond.mask.shape[1] + CFG.num_tokens + 1
    net(None, cond.layers, cond.mask, cache)
    row = torch.zeros(2, 1, CFG.num_bits)
    for _ in range(CFG.num_tokens - 1):
        net.decode_step(row, cache)
    assert [(layer.k_buffer.data_ptr(), layer.v_buffer.data_ptr()) for layer in cache.layers] == buffers
    assert cache.length == CFG.num_tokens and cache.layers[0].length == cache.layers[0].capacity - 1
    assert torch.equal(cache.layers[0].valid[:, : cond.mask.shape[1]], cond.mask)
    net.decode_step(row, cache)  # the last row: the cache is full
    with pytest.raises(ValueError, match="longer than the model"):
        net.decode_step(row, cache)


def test_static_kv_cache_update_contract():
    cache = StaticKVCache(2, 1, 5, 3, dtype=torch.float32)
    k = torch.randn(2, 1, 2, 3)
    valid = torch.tensor([[True, False], [True, True]])
    keys, values, mask = cache.update(k, k * 2, valid)
    assert torch.equal(keys, k) and torch.equal(values, k * 2) and torch.equal(mask, valid)
    keys, _, mask = cache.update(k[:, :, :1], k[:, :, :1], None)
    assert keys.shape[2] == 3 and mask[:, 2].all() and len(cache) == 3
    with pytest.raises(ValueError, match="holds 5 keys"):
        cache.update(torch.zeros(2, 1, 3, 3), torch.zeros(2, 1, 3, 3), None)


def test_a_static_cache_needs_the_text_length_and_says_so(net):
    with pytest.raises(TypeError, match="text_length"):  # was a TypeError from None + int, naming neither
        net.new_cache(2)
