"""Bernoulli diffusion (binlat.processes.diffusion) as a whole: its training loss against hand-computed BCE, and
its sampler: shapes and binary values, one result per seed whatever the batch, the last step's threshold, large
logits, temperature zero, guidance; bad arguments and settings are refused. The step formulas themselves:
tests/test_processes_formulas.py."""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from binlat.generators import DiffusionConfig, DiffusionTransformer
from binlat.processes import BernoulliDiffusion
from binlat.processes.common import make_generators
from binlat.processes.diffusion import step_protocol1
from binlat.text import TextFeatures
from processes_support import CFG, TEXT_DIM, ConstantDiffusionNet, is_binary, randomise, text


@pytest.fixture(scope="module")
def diff_net() -> DiffusionTransformer:
    torch.manual_seed(0)
    return randomise(DiffusionTransformer(CFG), 1)


# --- training losses -------------------------------------------------------------------------------------------
def test_diffusion_loss_flip_is_bce_against_x0() -> None:
    x0 = torch.tensor([[[1.0, 0.0]]])
    net = ConstantDiffusionNet(torch.tensor([[[2.0, -1.0]]]))
    feats = text([3], 0, num_layers=1)
    # t = 0 -> x_t = x_0; flip logits (1 - 2 x_t) out = [-2, -1]
    # BCE: -log sigmoid(-2) = log(1 + e^2) = 2.126928, -log(1 - sigmoid(-1)) = log(1 + e^-1) = 0.313262
    loss, metrics = BernoulliDiffusion(prediction="flip").loss(net, x0, feats, t=torch.tensor([0.0]))
    assert loss.item() == pytest.approx(1.2200948492805979, abs=1e-6)
    assert metrics["bit_accuracy"].item() == pytest.approx(0.5)  # -2 -> 0 (wrong), -1 -> 0 (right)
    assert torch.equal(net.calls[0][0], x0) and net.calls[0][1].tolist() == [0.0]


def test_diffusion_loss_x0_is_bce_against_x0() -> None:
    x0 = torch.tensor([[[1.0, 0.0]]])
    net = ConstantDiffusionNet(torch.tensor([[[2.0, -1.0]]]))
    # logits used as is: log(1 + e^-2) = 0.126928, log(1 + e^-1) = 0.313262
    loss, metrics = BernoulliDiffusion(prediction="x0").loss(net, x0, text([3], 0, 1), t=torch.tensor([0.5]))
    assert loss.item() == pytest.approx(0.2200948492805977, abs=1e-6)
    assert metrics["bit_accuracy"].item() == 1.0
    assert net.calls[0][1].tolist() == [0.5]


def test_diffusion_loss_noisy_matches_manual_bce() -> None:
    """At t = 1 x_t is random: the loss must be the BCE computed from whatever x_t the network was shown."""
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(3, 4, 5, generator=g) < 0.5).float()
    out = torch.randn(1, 4, 5, generator=g)
    net = ConstantDiffusionNet(out)
    t = torch.tensor([1.0, 0.3, 0.7])
    noise = torch.rand(3, 4, 5, generator=g)
    loss, _ = BernoulliDiffusion().loss(net, x0, text([2, 3, 1], 0, 1), t=t, noise=noise)
    x_t, t_seen = net.calls[0]
    assert torch.equal(t_seen, t)
    # x_t = [noise < x_0 (1 - t) + t / 2]
    assert torch.equal(x_t, (noise < x0 * (1 - t.view(-1, 1, 1)) + t.view(-1, 1, 1) / 2).float())
    logits = (1 - 2 * x_t) * out
    prob = torch.sigmoid(logits.double())
    manual = -(x0 * prob.log() + (1 - x0) * (1 - prob).log()).mean()
    assert loss.item() == pytest.approx(manual.item(), abs=1e-6)


def test_diffusion_loss_samples_t_when_not_given(diff_net) -> None:
    torch.manual_seed(0)
    bits = (torch.rand(2, CFG.num_tokens, CFG.num_bits) < 0.5).float()
    loss, metrics = BernoulliDiffusion().loss(diff_net, bits, text([3, 5], 0))
    assert loss.ndim == 0 and math.isfinite(loss.item()) and 0 <= metrics["bit_accuracy"].item() <= 1


# --- diffusion sampling ----------------------------------------------------------------------------------------
def test_diffusion_sample_shape_and_values(diff_net) -> None:
    cond, uncond = text([3, 5], 0), text([1], 9)
    for protocol in (1, 2):
        bits = BernoulliDiffusion().sample(
            diff_net, cond, uncond, make_generators([0, 1]), num_steps=3, guidance_scale=2.0, protocol=protocol, rho=2.0
        )
        assert bits.shape == (2, CFG.num_tokens, CFG.num_bits)
        assert is_binary(bits)


def test_diffusion_sample_deterministic_per_seed(diff_net) -> None:
    cond, uncond = text([3, 5], 0), text([1], 9)
    kw = dict(num_steps=4, guidance_scale=1.5)
    a = BernoulliDiffusion().sample(diff_net, cond, uncond, make_generators([10, 11]), **kw)
    b = BernoulliDiffusion().sample(diff_net, cond, uncond, make_generators([10, 11]), **kw)
    c = BernoulliDiffusion().sample(diff_net, cond, uncond, make_generators([12, 13]), **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_diffusion_sample_per_sample_independence(diff_net) -> None:
    a_feats, b_feats = text([3], 0), text([5], 1)
    both = TextFeatures.cat([a_feats, b_feats])  # a is left padded by 2 more positions in the batch
    uncond = text([1], 9)
    kw = dict(num_steps=4, guidance_scale=2.0, temperature=1.0)
    pair = BernoulliDiffusion().sample(diff_net, both, uncond, make_generators([7, 8]), **kw)
    alone = BernoulliDiffusion().sample(diff_net, a_feats, uncond, make_generators([7]), **kw)
    assert torch.equal(pair[:1], alone)
    swapped = BernoulliDiffusion().sample(
        diff_net, TextFeatures.cat([b_feats, a_feats]), uncond, make_generators([8, 7]), **kw
    )
    assert torch.equal(swapped[1:], alone)


def test_diffusion_last_step_thresholds_at_half() -> None:
    cfg = DiffusionConfig(num_bits=4, num_tokens=3, num_layers=1, num_heads=1, head_dim=4, text_dim=TEXT_DIM)
    feats = text([2], 0, 1)
    for prob, expected in ((0.6, 1.0), (0.4, 0.0)):
        net = ConstantDiffusionNet(torch.full((1, 3, 4), math.log(prob / (1 - prob))), config=cfg)
        for seed in range(3):
            for steps in (1, 3):
                x = BernoulliDiffusion(prediction="x0").sample(
                    net, feats, None, make_generators([seed]), num_steps=steps, guidance_scale=0.0
                )
                # p = 0.6 (0.4) on the last step: thresholded, never sampled
                assert torch.equal(x, torch.full((1, 3, 4), expected))


def test_diffusion_large_logits_give_the_deterministic_answer() -> None:
    cfg = DiffusionConfig(num_bits=5, num_tokens=4, num_layers=1, num_heads=1, head_dim=4, text_dim=TEXT_DIM)
    target = (torch.rand(1, 4, 5, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    feats, uncond = text([2, 3], 0, 1), text([1], 1, 1)
    # "flip" network that knows the answer: flipped where x_t differs from the target, logit +-50
    flip_net = ConstantDiffusionNet(fn=lambda x_t, t: 50.0 * (2 * (x_t - target).abs() - 1), config=cfg)
    x0_net = ConstantDiffusionNet(fn=lambda x_t, t: 50.0 * (2 * target - 1).expand(x_t.shape[0], -1, -1), config=cfg)
    for prediction, net in (("flip", flip_net), ("x0", x0_net)):
        for protocol in (1, 2):
            for temperature in (1.0, 0.0):
                x = BernoulliDiffusion(prediction=prediction).sample(
                    net,
                    feats,
                    uncond,
                    make_generators([3, 4]),
                    num_steps=5,
                    guidance_scale=3.0,
                    temperature=temperature,
                    protocol=protocol,
                )
                assert torch.equal(x, target.expand(2, -1, -1)), (prediction, protocol, temperature)


def test_diffusion_temperature_zero_deterministic(diff_net) -> None:
    cond, uncond = text([3, 5], 0), text([1], 9)
    a = BernoulliDiffusion().sample(diff_net, cond, uncond, make_generators([1, 2]), num_steps=3, temperature=0.0)
    b = BernoulliDiffusion().sample(diff_net, cond, uncond, make_generators([1, 2]), num_steps=3, temperature=0.0)
    assert torch.equal(a, b) and is_binary(a)
    # a network whose x0 logit is a small positive constant: temperature 0 turns it into certainty, every seed
    cfg = DiffusionConfig(num_bits=4, num_tokens=3, num_layers=1, num_heads=1, head_dim=4, text_dim=TEXT_DIM)
    net = ConstantDiffusionNet(torch.full((1, 3, 4), 0.05), config=cfg)
    for seed in range(4):
        x = BernoulliDiffusion(prediction="x0").sample(
            net, text([2], 0, 1), None, make_generators([seed]), num_steps=4, temperature=0.0, guidance_scale=0.0
        )
        assert torch.equal(x, torch.ones(1, 3, 4))


def test_diffusion_guidance_combines_cond_and_uncond() -> None:
    """The sampler feeds [cond ; uncond] and thresholds (1 + w) cond - w uncond."""
    cfg = DiffusionConfig(num_bits=2, num_tokens=1, num_layers=1, num_heads=1, head_dim=4, text_dim=TEXT_DIM)
    # cond rows get logit 1, uncond rows logit 2: w = 2 gives 3 - 4 = -1 < 0, w = 0.5 gives 1.5 - 1 = 0.5 > 0
    net = ConstantDiffusionNet(
        fn=lambda x_t, t: (
            torch.cat((torch.full((1, 1, 2), 1.0), torch.full((1, 1, 2), 2.0)))
            if x_t.shape[0] == 2
            else torch.full((1, 1, 2), 1.0)
        ),
        config=cfg,
    )
    proc = BernoulliDiffusion(prediction="x0")
    kw = dict(num_steps=1, temperature=1.0)
    assert proc.sample(
        net, text([2], 0, 1), text([1], 1, 1), make_generators([0]), guidance_scale=2.0, **kw
    ).tolist() == [[[0.0, 0.0]]]
    assert proc.sample(
        net, text([2], 0, 1), text([1], 1, 1), make_generators([0]), guidance_scale=0.5, **kw
    ).tolist() == [[[1.0, 1.0]]]


# --- argument checking -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_steps=0), "steps"),
        (dict(num_steps=-2), "steps"),
        (dict(num_steps=2.5), "steps"),
        (dict(guidance_scale=-1.0), "guidance"),
        (dict(guidance_scale=float("inf")), "guidance"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=-0.1), "temperature"),
        (dict(rho=0.0), "rho"),
        (dict(rho=-1.0), "rho"),
        (dict(protocol=3), "protocol"),
    ],
)
def test_diffusion_sample_bad_arguments(diff_net, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        BernoulliDiffusion().sample(diff_net, text([2], 0), text([1], 1), make_generators([0]), **kwargs)


def test_bad_process_settings() -> None:
    with pytest.raises(ValueError, match="prediction"):
        BernoulliDiffusion(prediction="eps")
    with pytest.raises(ValueError, match="time_sampling"):
        BernoulliDiffusion(time_sampling="cosine")


def test_one_generator_per_sample_required() -> None:
    with pytest.raises(ValueError, match="generator"):
        step_protocol1(torch.full((2, 1, 1), 0.5), 0.5, make_generators([0]))
