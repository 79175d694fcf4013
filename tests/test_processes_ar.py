"""Autoregressive decoding (binlat.processes.ar): the teacher-forced training loss (by hand, against a rebuild from
each row's own prefix, with the context noised and the targets not), and the sampler: shapes, one result per seed
whatever the batch, temperature zero, a prefix kept; the KV cache gives the full recomputation's logits bit for
bit; bad arguments are refused."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch import nn

from binlat.generators import ARTransformer
from binlat.processes import ARDecoding
from binlat.processes.common import make_generators
from binlat.text import TextFeatures
from processes_support import AR_CFG, CFG, is_binary, randomise, text


@pytest.fixture(scope="module")
def ar_net() -> ARTransformer:
    torch.manual_seed(0)
    return randomise(ARTransformer(AR_CFG), 2)


class ConstantARNet(nn.Module):
    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))
        self.out = out
        self.inputs: list[torch.Tensor | None] = []

    def forward(self, bits, layers, mask, cache=None):
        self.inputs.append(None if bits is None else bits.clone())
        return self.out.clone()


# --- training loss ---------------------------------------------------------------------------------------------
def test_ar_loss_constant_network_hand_computed() -> None:
    bits = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])  # N=1, K=2, B=2
    net = ConstantARNet(torch.tensor([[[2.0, -1.0], [0.5, 3.0]]]))
    loss, metrics = ARDecoding().loss(net, bits, text([2], 0, 1))
    # log(1+e^-2) + log(1+e^-1) + log(1+e^0.5) + log(1+e^3) = 0.126928 + 0.313262 + 0.974077 + 3.048587, / 4
    assert loss.item() == pytest.approx(1.115713508578761, abs=1e-6)
    assert metrics["bit_accuracy"].item() == pytest.approx(0.5)
    # teacher forcing: the network sees the tokens before the last one
    assert torch.equal(net.inputs[0], bits[:, :-1])


def test_ar_loss_teacher_forcing_matches_manual(ar_net) -> None:
    """Row i predicts token i from tokens < i: rebuild each row's logits from its own prefix and compare BCE."""
    g = torch.Generator().manual_seed(4)
    bits = (torch.rand(2, CFG.num_tokens, CFG.num_bits, generator=g) < 0.5).float()
    feats = text([4, 2], 1)
    loss, _ = ARDecoding().loss(ar_net, bits, feats)
    with torch.no_grad():
        rows = [ar_net(bits[:, :i] if i else None, feats.layers, feats.mask)[:, -1] for i in range(CFG.num_tokens)]
    logits = torch.stack(rows, dim=1).double()
    prob = torch.sigmoid(logits)
    manual = -(bits * prob.log() + (1 - bits) * (1 - prob).log()).mean()
    assert loss.item() == pytest.approx(manual.item(), abs=1e-5)


def test_ar_context_flip_noises_the_context_not_the_targets() -> None:
    g = torch.Generator().manual_seed(5)
    bits = (torch.rand(8, 40, 16, generator=g) < 0.5).float()
    out = torch.randn(8, 40, 16, generator=g)
    clean_net = ConstantARNet(out)
    clean, _ = ARDecoding().loss(clean_net, bits, text([2] * 8, 0, 1), make_generators(range(8)))
    net = ConstantARNet(out)
    noisy, _ = ARDecoding(context_flip=0.2).loss(net, bits, text([2] * 8, 0, 1), make_generators(range(8)))
    assert torch.equal(clean_net.inputs[0], bits[:, :-1])
    flipped = net.inputs[0] != bits[:, :-1]
    assert 0.17 < flipped.float().mean().item() < 0.23 and is_binary(net.inputs[0])
    assert torch.equal(noisy, clean)  # the same outputs scored against the same clean targets
    ARDecoding(context_flip=0.2).loss(net, bits, text([2] * 8, 0, 1), make_generators(range(8)))
    assert torch.equal(net.inputs[1], net.inputs[0])  # drawn from the samples' own generators
    alone = ConstantARNet(out[3:4])
    ARDecoding(context_flip=0.2).loss(alone, bits[3:4], text([2], 0, 1), make_generators([3]))
    assert torch.equal(alone.inputs[0], net.inputs[0][3:4])  # sample 3's flips do not depend on its batch
    with pytest.raises(ValueError, match="context_flip"):
        ARDecoding(context_flip=0.5)


# --- AR decoding -----------------------------------------------------------------------------------------------
def test_ar_sample_shape_and_values(ar_net) -> None:
    bits = ARDecoding().sample(ar_net, text([3, 5, 1], 0), text([1], 9), make_generators([0, 1, 2]), guidance_scale=2.0)
    assert bits.shape == (3, CFG.num_tokens, CFG.num_bits) and is_binary(bits)


def test_ar_sample_deterministic_per_seed(ar_net) -> None:
    cond, uncond = text([3, 5], 0), text([1], 9)
    a = ARDecoding().sample(ar_net, cond, uncond, make_generators([10, 11]), guidance_scale=1.0)
    b = ARDecoding().sample(ar_net, cond, uncond, make_generators([10, 11]), guidance_scale=1.0)
    c = ARDecoding().sample(ar_net, cond, uncond, make_generators([12, 13]), guidance_scale=1.0)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_ar_temperature_zero_ignores_seed(ar_net) -> None:
    cond, uncond = text([3, 5], 0), text([1], 9)
    a = ARDecoding().sample(ar_net, cond, uncond, make_generators([1, 2]), guidance_scale=1.0, temperature=0.0)
    b = ARDecoding().sample(ar_net, cond, uncond, make_generators([3, 4]), guidance_scale=1.0, temperature=0.0)
    assert torch.equal(a, b) and is_binary(a)


def test_ar_sample_per_sample_independence(ar_net) -> None:
    a_feats, b_feats = text([3], 0), text([5], 1)
    uncond = text([2], 9)
    for use_cache in (True, False):
        proc = ARDecoding(use_cache=use_cache)
        pair = proc.sample(
            ar_net,
            TextFeatures.cat([a_feats, b_feats]),
            uncond,
            make_generators([7, 8]),
            guidance_scale=2.0,
            temperature=1.0,
        )
        alone = proc.sample(ar_net, a_feats, uncond, make_generators([7]), guidance_scale=2.0, temperature=1.0)
        assert torch.equal(pair[:1], alone), use_cache


@pytest.mark.parametrize("guidance", [0.0, 3.0], ids=["no_guidance", "guidance"])
@pytest.mark.parametrize("prefix_len", [0, 2], ids=["no_prefix", "prefix"])
def test_ar_kv_cache_matches_full_recomputation(ar_net, guidance: float, prefix_len: int) -> None:
    """THE key property: cached decoding gives, step by step, the logits of the release's algorithm
    (recompute the whole sequence each step), hence the same bits."""
    cond, uncond = text([3, 5, 2], 0), text([2], 9)
    prefix = None
    if prefix_len:
        prefix = (torch.rand(3, prefix_len, CFG.num_bits, generator=torch.Generator().manual_seed(5)) < 0.5).float()
    kw = dict(guidance_scale=guidance, temperature=1.0, prefix=prefix, return_logits=True)
    fast_bits, fast_logits = ARDecoding(use_cache=True).sample(ar_net, cond, uncond, make_generators([1, 2, 3]), **kw)
    ref_bits, ref_logits = ARDecoding(use_cache=False).sample(ar_net, cond, uncond, make_generators([1, 2, 3]), **kw)
    assert fast_bits.shape == ref_bits.shape == (3, CFG.num_tokens, CFG.num_bits)
    assert torch.equal(fast_bits, ref_bits)
    assert len(fast_logits) == len(ref_logits) == CFG.num_tokens - prefix_len
    for step, (a, b) in enumerate(zip(fast_logits, ref_logits)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=f"step {step}")
    if prefix is not None:
        assert torch.equal(fast_bits[:, :prefix_len], prefix)

    # independent check of both: teacher-forced pass over the final tokens, guided by hand
    with torch.no_grad():
        c = ar_net(fast_bits[:, :-1], cond.layers, cond.mask)
        u_feats = uncond.index([0, 0, 0])
        u = ar_net(fast_bits[:, :-1], u_feats.layers, u_feats.mask)
    expected = (1 + guidance) * c - guidance * u if guidance else c
    torch.testing.assert_close(torch.stack(fast_logits, dim=1), expected[:, prefix_len:], atol=1e-5, rtol=0)


def test_ar_cache_matches_reference_with_temperature_zero(ar_net) -> None:
    cond, uncond = text([4, 1], 3), text([1], 8)
    a = ARDecoding(use_cache=True).sample(
        ar_net, cond, uncond, make_generators([0, 1]), guidance_scale=5.0, temperature=0.0
    )
    b = ARDecoding(use_cache=False).sample(
        ar_net, cond, uncond, make_generators([0, 1]), guidance_scale=5.0, temperature=0.0
    )
    assert torch.equal(a, b)


def test_ar_full_prefix_returns_prefix(ar_net) -> None:
    prefix = (torch.rand(1, CFG.num_tokens, CFG.num_bits, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    bits, logits = ARDecoding().sample(
        ar_net, text([2], 0), None, make_generators([0]), guidance_scale=0.0, prefix=prefix, return_logits=True
    )
    assert torch.equal(bits, prefix) and logits == []


# --- argument checking -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(guidance_scale=-1.0), "guidance"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=-1.0), "temperature"),
    ],
)
def test_ar_sample_bad_arguments(ar_net, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        ARDecoding().sample(ar_net, text([2], 0), text([1], 1), make_generators([0]), **kwargs)


def test_ar_prefix_too_long(ar_net) -> None:
    prefix = torch.zeros(1, CFG.num_tokens + 1, CFG.num_bits)
    with pytest.raises(ValueError, match="prefix"):
        ARDecoding().sample(ar_net, text([2], 0), None, make_generators([0]), guidance_scale=0.0, prefix=prefix)
