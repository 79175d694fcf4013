"""The AR generator's grouped token head (ARConfig.bit_groups): a token's B bits as g consecutive groups,
group j a categorical over its 2^(B/g) values given the groups before it.

Checked here: the config's limits and who refuses it; the bits <-> value convention (first bit most significant);
the network (teacher-forced group logits equal the decoding call's, group j reads only groups < j, the caches still
equal the full forward); the loss against hand-computed numbers and its per-bit scale; the categorical draw; and
sampling: every decode mode gives the same bits, a sample does not depend on its batch, guidance is applied to the
group logits with the unconditional rows reading the drawn values; save/load and the pipeline."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import binlat.processes.ar as ar_mod
from binlat.config import ConfigError, config_from_dict
from binlat.generators import ARConfig, ARTransformer, DiffusionConfig
from binlat.processes import ARDecoding
from binlat.processes.ar import bits_to_values, teacher_forced, values_to_bits
from binlat.processes.common import categorical, make_generators
from binlat.text import TextFeatures

TEXT_DIM = 12
CFG = ARConfig(num_bits=16, num_tokens=10, num_layers=2, num_heads=2, head_dim=8, text_dim=TEXT_DIM, bit_groups=2)


def randomise(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def net() -> ARTransformer:
    torch.manual_seed(0)
    return randomise(ARTransformer(CFG), 1)


def text(lengths: list[int], seed: int) -> TextFeatures:
    """Left-padded features with garbage in the padding, one layer per block."""
    g = torch.Generator().manual_seed(seed)
    n, length = len(lengths), max(lengths)
    mask = torch.zeros(n, length, dtype=torch.bool)
    for i, k in enumerate(lengths):
        mask[i, length - k :] = True
    return TextFeatures([torch.randn(n, length, TEXT_DIM, generator=g) for _ in range(CFG.num_layers)], mask)


def random_bits(n: int, k: int, b: int, seed: int) -> torch.Tensor:
    return (torch.rand(n, k, b, generator=torch.Generator().manual_seed(seed)) < 0.5).float()


# --- the config and who takes it ----------------------------------------------------------------------------------
def test_bit_groups_limits_are_checked_with_clear_errors() -> None:
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="bit_groups must be an integer >= 1"):
            ARConfig(bit_groups=bad)
    small = dict(num_tokens=4, num_layers=1, num_heads=1, head_dim=8, text_dim=8)
    with pytest.raises(ValueError, match=r"bit_groups \(3\) must divide num_bits \(16\)"):
        ARTransformer(ARConfig(num_bits=16, bit_groups=3, **small))
    # 32 bits in 2 groups would be categoricals over 65,536 values; 4 groups of 8 bits is the fewest that fits
    with pytest.raises(ValueError, match="16 bits per group.*fewest groups that fit is 4"):
        ARTransformer(ARConfig(num_bits=32, bit_groups=2, **small))
    with pytest.raises(ValueError, match="fewest groups that fit is 8"):  # 6 would fit 12 bits but not divide 64
        ARTransformer(ARConfig(num_bits=64, bit_groups=4, **small))
    assert ARTransformer(ARConfig(num_bits=24, bit_groups=2, **small)).head.out[0].out_features == 4096
    # the diffusion generator predicts one logit per bit: its config has no such option, and refuses it when read
    with pytest.raises(ConfigError, match="bit_groups is the AR generator's option, not the diffusion generator's"):
        config_from_dict(DiffusionConfig, {"num_bits": 16, "bit_groups": 2, **small})
    # a config read before its tokenizer fixes num_bits (the default 64 here) is not refused for the group size
    assert ARConfig(bit_groups=2).bit_groups == 2


def test_the_release_head_is_untouched() -> None:
    """bit_groups = 1: the same parameters (names, shapes, initial values under one seed) as a config without the
    field, bit logits out, and the grouped calls refused."""
    plain = ARConfig(num_bits=16, num_tokens=4, num_layers=1, num_heads=2, head_dim=8, text_dim=8)
    torch.manual_seed(3)
    a = ARTransformer(plain)
    torch.manual_seed(3)
    b = ARTransformer(ARConfig(**{**plain.__dict__, "bit_groups": 1}))
    assert a.head is None and isinstance(a.proj_out, nn.Linear)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not any(k.startswith("head.") for k in a.state_dict())
    words = [torch.randn(2, 3, 8)]
    assert a(None, words, torch.ones(2, 3, dtype=torch.bool)).shape == (2, 1, 16)
    with pytest.raises(ValueError, match="grouped head"):
        a.group_logits(torch.zeros(2, 16), torch.zeros(2, 0, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="group_values"):
        a(None, words, torch.ones(2, 3, dtype=torch.bool), group_values=torch.zeros(2, 1, 1, dtype=torch.long))


# --- bits <-> values -----------------------------------------------------------------------------------------------
def test_bits_to_values_round_trip_first_bit_most_significant() -> None:
    token = torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 1.0])
    assert bits_to_values(token, 2).tolist() == [129, 3]
    assert bits_to_values(token, 4).tolist() == [8, 1, 0, 3]
    assert values_to_bits(torch.tensor([129, 3]), 8).tolist() == token.tolist()
    every = torch.arange(256)
    bits = values_to_bits(every[:, None], 8)  # 256 one-group tokens
    assert bits.shape == (256, 8) and torch.equal(bits_to_values(bits, 1)[:, 0], every)
    assert len({tuple(row) for row in bits.tolist()}) == 256  # every value its own bit pattern
    x = random_bits(3, 5, 24, 0)
    for groups in (1, 2, 3, 4, 6, 8):
        values = bits_to_values(x, groups)
        assert values.shape == (3, 5, groups) and values.dtype == torch.long
        assert torch.equal(values_to_bits(values, 24 // groups), x)


# --- the network ---------------------------------------------------------------------------------------------------
def test_grouped_network_outputs_and_causality(net) -> None:
    feats = text([3, 5], 0)
    bits = random_bits(2, 5, 16, 1)
    values = bits_to_values(torch.cat((bits, random_bits(2, 1, 16, 2)), 1), 2)  # the 6 rows' target tokens
    with torch.no_grad():
        hidden = net(bits, feats.layers, feats.mask)
        assert hidden.shape == (2, 6, CFG.dim)
        logits = net(bits, feats.layers, feats.mask, group_values=values)
        assert logits.shape == (2, 6, 2, 256)
        # teacher forcing is the decoding call: group j from the hidden state and the true groups < j
        for j in range(2):
            torch.testing.assert_close(logits[..., j, :], net.group_logits(hidden, values[..., :j], j), atol=0, rtol=0)
        # group j reads groups < j only: changing group 1's value leaves both groups' logits of that row alone,
        # changing group 0's changes group 1's
        other = values.clone()
        other[..., 1] = (other[..., 1] + 7) % 256
        assert torch.equal(net(bits, feats.layers, feats.mask, group_values=other), logits)
        other = values.clone()
        other[..., 0] = (other[..., 0] + 7) % 256
        moved = net(bits, feats.layers, feats.mask, group_values=other)
        assert torch.equal(moved[..., 0, :], logits[..., 0, :])
        assert (moved[..., 1, :] - logits[..., 1, :]).abs().amax(-1).gt(0).all()  # every row moved
    with pytest.raises(ValueError, match="group_values must be"):
        net(bits, feats.layers, feats.mask, group_values=values[..., :1])
    with pytest.raises(ValueError, match="reads the values of the 1 groups before it"):
        net.group_logits(hidden, values[..., :0], 1)
    with pytest.raises(ValueError, match="outside the head's 2 groups"):
        net.group_logits(hidden, values, 2)


def test_grouped_network_caches_equal_the_full_forward(net) -> None:
    feats = text([4, 2], 3)
    bits = random_bits(2, CFG.num_tokens - 1, 16, 4)
    with torch.no_grad():
        full = net(bits, feats.layers, feats.mask)
        cache = net.new_cache()
        rows = [net(None, feats.layers, feats.mask, cache)]
        rows += [net(bits[:, i : i + 1], feats.layers, feats.mask, cache) for i in range(bits.shape[1])]
        torch.testing.assert_close(torch.cat(rows, 1), full, atol=1e-5, rtol=0)
        static = net.new_cache(2, feats.mask.shape[1])
        steps = [net(None, feats.layers, feats.mask, static)[:, -1]]
        steps += [net.decode_step(bits[:, i : i + 1], static) for i in range(bits.shape[1])]
        torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=0)


def test_grouped_network_round_trips_through_save_and_load(net, tmp_path) -> None:
    net.save_pretrained(tmp_path / "ar")
    loaded = ARTransformer.from_pretrained(tmp_path / "ar").eval()
    assert loaded.config == net.config and loaded.config.bit_groups == 2
    assert loaded.state_dict().keys() == net.state_dict().keys()
    assert any(k.startswith("head.embed.0") for k in loaded.state_dict())
    feats = text([3], 5)
    a = ARDecoding().sample(net, feats, None, make_generators([9]), guidance_scale=0.0)
    b = ARDecoding().sample(loaded, feats, None, make_generators([9]), guidance_scale=0.0)
    assert torch.equal(a, b)


# --- the loss ------------------------------------------------------------------------------------------------------
class ConstantGroupNet(nn.Module):
    """Fake grouped network: fixed teacher-forced group logits, recording what it was handed."""

    def __init__(self, logits: torch.Tensor, config: ARConfig):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))
        self.config, self.logits = config, logits
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, bits, layers, mask, cache=None, group_values=None):
        self.calls.append((bits.clone(), group_values.clone()))
        return self.logits.clone()


def test_group_loss_hand_computed() -> None:
    cfg = ARConfig(num_bits=4, num_tokens=2, num_layers=1, num_heads=1, head_dim=4, text_dim=TEXT_DIM, bit_groups=2)
    bits = torch.tensor([[[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]]])  # values: token 0 (2, 3), token 1 (0, 1)
    logits = torch.tensor(
        [[[[2.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 3.0]], [[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]]]
    )
    net = ConstantGroupNet(logits, cfg)
    loss, metrics = ARDecoding().loss(net, bits, text([2], 0))
    context, values = net.calls[0]
    assert torch.equal(context, bits[:, :-1]) and values.tolist() == [[[2, 3], [0, 1]]]
    # -log softmax of each group's logits at its true value
    nll = [
        math.log(math.e**2 + 1 + math.e + 1) - 1.0,  # token 0 group 0: logits (2, 0, 1, 0), value 2
        math.log(3 + math.e**3) - 3.0,  # token 0 group 1: (0, 0, 0, 3), value 3
        math.log(3 + math.e) - 0.0,  # token 1 group 0: (0, 1, 0, 0), value 0
        math.log(4.0),
    ]  # token 1 group 1: uniform, value 1
    assert loss.item() == pytest.approx(sum(nll) / 8, abs=1e-6)  # nats per bit: 2 tokens x 4 bits
    # most likely values (0, 3) and (1, 0): bits 0011 and 0100 against 1011 and 0001, 3 + 2 of 8 right
    assert metrics["bit_accuracy"].item() == pytest.approx(5 / 8)


def test_group_loss_context_flip_noises_the_context_not_the_targets() -> None:
    cfg = ARConfig(num_bits=16, num_tokens=30, num_layers=1, num_heads=1, head_dim=4, text_dim=TEXT_DIM, bit_groups=2)
    bits = random_bits(8, 30, 16, 12)
    net = ConstantGroupNet(torch.zeros(8, 30, 2, 256), cfg)
    loss, _ = ARDecoding(context_flip=0.2).loss(net, bits, text([2] * 8, 0), make_generators(range(8)))
    context, values = net.calls[0]
    assert 0.15 < (context != bits[:, :-1]).float().mean().item() < 0.25
    assert torch.equal(values, bits_to_values(bits, 2))  # the targets are the clean tokens
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)


def test_group_loss_is_comparable_to_the_bit_loss(net) -> None:
    """A head that knows nothing (all logits 0) scores ln 2 per bit with either head; the real network's loss is the
    teacher-forced NLL summed over tokens' groups, per bit, and teacher_forced gives the same figures."""
    bits, feats = random_bits(2, CFG.num_tokens, 16, 6), text([3, 4], 7)
    blank = randomise(ARTransformer(CFG), 8)
    plain = randomise(ARTransformer(ARConfig(**{**CFG.__dict__, "bit_groups": 1})), 8)
    with torch.no_grad():
        for out in (*blank.head.out, plain.proj_out):
            out.weight.zero_()
            out.bias.zero_()
    for model in (blank, plain):
        loss, _ = ARDecoding().loss(model, bits, feats)
        assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    loss, metrics = ARDecoding().loss(net, bits, feats)
    log_p, top = teacher_forced(net, bits, feats)
    assert log_p.shape == top.shape == (2, CFG.num_tokens, 2)
    assert loss.item() == pytest.approx(-log_p.sum().item() / bits.numel(), rel=1e-5)
    assert bool((top >= log_p.exp() - 1e-6).all()) and bool((top <= 1).all())
    with torch.no_grad():  # by hand from the decoding calls
        hidden = net(bits[:, :-1], feats.layers, feats.mask)
        values = bits_to_values(bits, 2)
        manual = sum(
            torch.log_softmax(net.group_logits(hidden, values[..., :j], j), -1).gather(-1, values[..., j : j + 1]).sum()
            for j in range(2)
        )
    assert loss.item() == pytest.approx(-manual.item() / bits.numel(), rel=1e-5)
    assert 0 <= metrics["bit_accuracy"].item() <= 1
    # the bit head's teacher_forced is its per-bit BCE and certainty
    log_p, top = teacher_forced(plain, bits, feats)
    assert log_p.shape == (2, CFG.num_tokens, 16)
    assert torch.allclose(log_p, torch.full_like(log_p, -math.log(2))) and torch.allclose(
        top, torch.full_like(top, 0.5)
    )


# --- the categorical draw ------------------------------------------------------------------------------------------
def test_categorical_draws_per_sample_and_follows_the_probabilities() -> None:
    probs = torch.tensor([0.5, 0.0, 0.2, 0.3])
    n = 4000
    draws = categorical(probs.expand(n, -1), make_generators(range(n)))
    assert draws.dtype == torch.long and draws.shape == (n,)
    counts = torch.bincount(draws, minlength=4).float() / n
    assert counts[1] == 0  # a value of probability 0 is never drawn
    assert torch.allclose(counts, probs, atol=0.03), counts
    # row i depends on generators[i] alone, not on the other rows or their count
    mixed = torch.softmax(torch.randn(3, 4096, generator=torch.Generator().manual_seed(0)), -1)
    three = categorical(mixed, make_generators([5, 6, 7]))
    assert categorical(mixed[1:2], make_generators([6])).item() == three[1].item()
    assert torch.equal(three, categorical(mixed, make_generators([5, 6, 7])))
    # certainty is certain, and the last value is reachable
    assert categorical(torch.tensor([[0.0, 0, 0, 1]] * 3), make_generators([1, 2, 3])).tolist() == [3, 3, 3]
    with pytest.raises(ValueError, match="one generator per sample"):
        categorical(mixed, make_generators([1]))


# --- sampling ------------------------------------------------------------------------------------------------------
def sample(net, seeds, guidance, prefix=None, decode="static", use_cache=True, temperature=1.0, lengths=None):
    cond = text(lengths or [3, 5, 2, 4][: len(seeds)], 0)
    return ARDecoding(use_cache=use_cache, decode=decode).sample(
        net,
        cond,
        text([2], 9),
        make_generators(seeds),
        guidance_scale=guidance,
        temperature=temperature,
        prefix=prefix,
        return_logits=True,
    )


@pytest.mark.parametrize("guidance", [0.0, 3.0], ids=["no_guidance", "guidance"])
@pytest.mark.parametrize("prefix_len", [0, 3], ids=["no_prefix", "prefix"])
def test_grouped_decoding_modes_give_the_same_bits(net, guidance, prefix_len, monkeypatch) -> None:
    """static == appending bit for bit (bits and logits), the release's recomputation gives the same bits, the
    fixed-shape step (compiled mode, run uncompiled here) agrees to float tolerance; and the returned logits are
    the teacher-forced logits of the drawn tokens, guided by hand (the unconditional rows read the drawn values)."""
    prefix = random_bits(3, prefix_len, 16, 11) if prefix_len else None
    bits, logits = sample(net, [1, 2, 3], guidance, prefix)
    assert bits.shape == (3, CFG.num_tokens, 16) and bool(((bits == 0) | (bits == 1)).all())
    assert len(logits) == CFG.num_tokens - prefix_len and logits[0].shape == (3, 2, 256)
    ref_bits, ref_logits = sample(net, [1, 2, 3], guidance, prefix, decode="appending")
    assert torch.equal(bits, ref_bits) and all(torch.equal(a, b) for a, b in zip(logits, ref_logits))
    slow_bits, slow_logits = sample(net, [1, 2, 3], guidance, prefix, use_cache=False)
    assert torch.equal(bits, slow_bits)
    for a, b in zip(logits, slow_logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    monkeypatch.setattr(ar_mod, "_compiled_step", lambda network: network.static_step)
    fixed_bits, fixed_logits = sample(net, [1, 2, 3], guidance, prefix, decode="compiled")
    assert torch.equal(bits, fixed_bits)
    for a, b in zip(logits, fixed_logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    if prefix is not None:
        assert torch.equal(bits[:, :prefix_len], prefix)
    cond, uncond = text([3, 5, 2], 0), text([2], 9).index([0, 0, 0])
    values = bits_to_values(bits, 2)
    with torch.no_grad():
        c = net(bits[:, :-1], cond.layers, cond.mask, group_values=values)
        u = net(bits[:, :-1], uncond.layers, uncond.mask, group_values=values)
    expected = (1 + guidance) * c - guidance * u if guidance else c
    torch.testing.assert_close(torch.stack(logits, 1), expected[:, prefix_len:], atol=1e-4, rtol=0)


def test_grouped_sample_depends_on_its_seed_alone(net) -> None:
    """The same sample in a batch of 1 and a batch of 3 (other prompts, more padding), every decode mode."""
    a, b, c = text([3], 20), text([5], 21), text([2], 22)
    three = TextFeatures.cat([a, b, c])
    kw = dict(guidance_scale=2.0, temperature=1.0)
    for mode, use_cache in (("static", True), ("appending", True), ("static", False)):
        process = ARDecoding(use_cache=use_cache, decode=mode)
        batch = process.sample(net, three, text([2], 9), make_generators([4, 5, 6]), **kw)
        alone = process.sample(net, a, text([2], 9), make_generators([4]), **kw)
        assert torch.equal(batch[:1], alone), mode
        alone = process.sample(net, c, text([2], 9), make_generators([6]), **kw)
        assert torch.equal(batch[2:], alone), mode
    again = ARDecoding().sample(net, three, text([2], 9), make_generators([4, 5, 6]), **kw)
    other = ARDecoding().sample(net, three, text([2], 9), make_generators([7, 8, 9]), **kw)
    assert torch.equal(batch, again) and not torch.equal(batch, other)


def test_grouped_temperature_zero_takes_each_groups_most_likely_value(net) -> None:
    a, logits = sample(net, [1, 2], 2.0, temperature=0.0)
    b, _ = sample(net, [3, 4], 2.0, temperature=0.0)
    assert torch.equal(a, b)
    chosen = bits_to_values(a, 2)
    assert torch.equal(torch.stack(logits, 1).argmax(-1), chosen)
    # and with a temperature the draws are not all the argmax
    c, _ = sample(net, [1, 2], 2.0, temperature=1.0)
    assert not torch.equal(a, c)


def test_pipeline_and_continuation_run_a_grouped_generator() -> None:
    from PIL import Image

    from binlat import editing
    from binlat.pipeline import Pipeline

    tiny = Pipeline.random_tiny()
    cfg = ARConfig(**{**tiny.generators["ar"].config.__dict__, "bit_groups": 4})  # 32 bits: 4 x 8
    torch.manual_seed(0)
    pipe = Pipeline(tiny.tokenizer, tiny.text_encoder, ar=ARTransformer(cfg).eval())
    out = pipe(["a red circle", "two squares"], kind="ar", seed=3, return_bits=True, progress=False)
    assert out.bits.shape == (2, 16, 32) and len(out.images) == 2
    alone = pipe(["two squares"], kind="ar", seed=4, return_bits=True, progress=False)
    assert torch.equal(alone.bits, out.bits[1:])
    edited = editing.continue_ar(pipe, Image.new("RGB", (64, 64), "white"), "a red circle", keep_tokens=5, seed=1)
    assert edited.bits.shape == (1, 16, 32)
