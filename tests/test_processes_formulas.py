"""The sampling and training formulas of binlat.processes against hand-computed numbers: forward noising, the flip
parametrisation, the time steps, guidance, the two sampling protocols and the training times.

Every expected value written as a literal below was worked out by hand from the formulas of the issue:
  forward noising      x_t ~ Bernoulli(x_0 (1 - t) + t/2)
  flip parametrisation x_0 logits = (1 - 2 x_t) * out,  p(x_0 = 1) = x_t (1 - f) + (1 - x_t) f
  time steps           t_i = (1 - i/N)^rho
  guidance             (1 + w) cond - w uncond
  protocol 1           x_t' ~ Bernoulli(p (1 - t') + t'/2)
  protocol 2           P(1) ∝ [p (1 - t') + t'/2][x_t (1 - s) + s/2],
                       P(0) ∝ [(1 - p)(1 - t') + t'/2][(1 - x_t)(1 - s) + s/2]
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import binlat.processes.diffusion as diffusion_mod
from binlat.generators import DiffusionConfig
from binlat.processes import BernoulliDiffusion
from binlat.processes.common import guide, make_generators
from binlat.processes.diffusion import (
    protocol2_prob,
    q_sample,
    step_protocol1,
    timesteps,
    x0_logits_from_flip,
    x0_prob_from_flip,
)
from processes_support import TEXT_DIM, ConstantDiffusionNet, is_binary, text


def capture_bernoulli(monkeypatch) -> list[torch.Tensor]:
    """Record the probabilities handed to binlat's per-sample Bernoulli sampler inside processes.diffusion."""
    seen: list[torch.Tensor] = []
    real = diffusion_mod.bernoulli

    def spy(probs, generators):
        seen.append(probs.clone())
        return real(probs, generators)

    monkeypatch.setattr(diffusion_mod, "bernoulli", spy)
    return seen


# --- forward noising -------------------------------------------------------------------------------------------
def test_q_sample_probability(monkeypatch) -> None:
    seen = capture_bernoulli(monkeypatch)
    x0 = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]], [[1.0, 0.0]]])  # [N=3, K=1, B=2]
    t = torch.tensor([0.5, 0.0, 1.0])
    x_t = q_sample(x0, t, make_generators([1, 2, 3]))
    assert x_t.shape == x0.shape and is_binary(x_t)
    # t = 0.5: 1 * 0.5 + 0.25 = 0.75 and 0 * 0.5 + 0.25 = 0.25; t = 0: x_0 itself; t = 1: a fair coin.
    expected = torch.tensor([[[0.75, 0.25]], [[1.0, 0.0]], [[0.5, 0.5]]])
    torch.testing.assert_close(seen[0], expected)
    assert x_t[1].tolist() == [[1.0, 0.0]]  # t = 0 leaves x_0 unchanged


def test_q_sample_empirical_frequency() -> None:
    n = 4000
    x0 = torch.tensor([1.0, 0.0]).expand(n, 25, 2)  # 100 000 draws per bit value
    t = torch.full((n,), 0.5)
    freq = q_sample(x0, t, make_generators(range(n))).mean(dim=(0, 1))
    # std of a frequency over 1e5 draws of p = 0.75 is ~0.0014; 0.01 is > 7 sigma
    assert abs(freq[0].item() - 0.75) < 0.01 and abs(freq[1].item() - 0.25) < 0.01
    # t = 0.2 with x0 = 1: 0.8 + 0.1 = 0.9; x0 = 0: 0.1
    freq = q_sample(x0, torch.full((n,), 0.2), make_generators(range(n, 2 * n))).mean(dim=(0, 1))
    assert abs(freq[0].item() - 0.9) < 0.01 and abs(freq[1].item() - 0.1) < 0.01
    # the global-RNG path (no generators) follows the same law
    with torch.random.fork_rng():
        torch.manual_seed(0)
        freq = q_sample(x0, t).mean(dim=(0, 1))
    assert abs(freq[0].item() - 0.75) < 0.01 and abs(freq[1].item() - 0.25) < 0.01


# --- parametrisation, schedule, guidance -----------------------------------------------------------------------
def test_x0_logits_from_flip() -> None:
    out = torch.tensor([2.0, -3.0, 1.5, 0.5])
    x_t = torch.tensor([1.0, 0.0, 0.0, 1.0])
    # (1 - 2 x_t) * out: x_t = 1 negates, x_t = 0 keeps
    assert x0_logits_from_flip(out, x_t).tolist() == [-2.0, -3.0, 1.5, -0.5]


def test_x0_prob_from_flip() -> None:
    f = torch.tensor([0.2, 0.2, 0.9, 0.9, 0.5])
    x_t = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    # x_t (1 - f) + (1 - x_t) f
    torch.testing.assert_close(x0_prob_from_flip(f, x_t), torch.tensor([0.8, 0.2, 0.1, 0.9, 0.5]))
    # consistent with the logit form: sigmoid(x0 logits) == x0 prob of sigmoid(flip logits)
    out = torch.tensor([2.0, -3.0, 1.5, 0.5, -1.0])
    torch.testing.assert_close(torch.sigmoid(x0_logits_from_flip(out, x_t)), x0_prob_from_flip(torch.sigmoid(out), x_t))


def test_timesteps() -> None:
    torch.testing.assert_close(timesteps(4, 2.0), torch.tensor([1.0, 0.5625, 0.25, 0.0625, 0.0], dtype=torch.float64))
    torch.testing.assert_close(timesteps(2, 1.0), torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64))
    torch.testing.assert_close(timesteps(1), torch.tensor([1.0, 0.0], dtype=torch.float64))
    # rho = 0.5: sqrt(1 - i/4)
    torch.testing.assert_close(
        timesteps(4, 0.5), torch.tensor([1.0, math.sqrt(0.75), math.sqrt(0.5), 0.5, 0.0], dtype=torch.float64)
    )


def test_guide() -> None:
    cond = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    uncond = torch.tensor([[0.5, 3.0], [1.0, -1.0]])
    both = torch.cat((cond, uncond))
    # w = 2: 3 cond - 2 uncond
    torch.testing.assert_close(guide(both, 2.0, 2), torch.tensor([[2.0, 0.0], [-2.0, -1.0]]))
    # w = 0.5: 1.5 cond - 0.5 uncond
    torch.testing.assert_close(guide(both, 0.5, 2), torch.tensor([[1.25, 1.5], [-0.5, -1.0]]))
    # no unconditional rows: the plain logits
    assert guide(cond, 7.5, 2) is cond


# --- sampling steps --------------------------------------------------------------------------------------------
def test_step_protocol1_probability(monkeypatch) -> None:
    seen = capture_bernoulli(monkeypatch)
    p = torch.tensor([[[0.9, 0.2, 1.0, 0.0]]])
    x = step_protocol1(p, 0.5, make_generators([0]))
    assert x.shape == p.shape and is_binary(x)
    # p * 0.5 + 0.25
    torch.testing.assert_close(seen[0], torch.tensor([[[0.7, 0.35, 0.75, 0.25]]]))
    # t' = 0: the estimate itself, so p in {0, 1} is reproduced exactly
    assert step_protocol1(torch.tensor([[[1.0, 0.0]]]), 0.0, make_generators([0])).tolist() == [[[1.0, 0.0]]]


def test_step_protocol1_empirical_frequency() -> None:
    n = 2000
    p = torch.tensor([0.9, 0.2]).expand(n, 50, 2)
    freq = step_protocol1(p, 0.5, make_generators(range(n))).mean(dim=(0, 1))
    assert abs(freq[0].item() - 0.7) < 0.01 and abs(freq[1].item() - 0.35) < 0.01


def test_protocol2_prob_hand_computed() -> None:
    # p = 0.8, t = 0.75, t' = 0.25, s = 0.5
    # x_t = 1: one = (0.8*0.75 + 0.125)(1*0.5 + 0.25) = 0.725*0.75 = 0.54375
    #          zero = (0.2*0.75 + 0.125)(0*0.5 + 0.25) = 0.275*0.25 = 0.06875 -> 0.54375/0.6125 = 0.887755...
    # x_t = 0: one = 0.725*0.25 = 0.18125, zero = 0.275*0.75 = 0.20625 -> 0.18125/0.3875 = 0.467742...
    p = torch.tensor([0.8, 0.8], dtype=torch.float64)
    x_t = torch.tensor([1.0, 0.0], dtype=torch.float64)
    got = protocol2_prob(p, x_t, 0.75, 0.25)
    torch.testing.assert_close(got, torch.tensor([0.8877551020408163, 0.46774193548387094], dtype=torch.float64))
    # at t' = 0 the new bit is the estimate: P = p exactly whatever x_t is (for p strictly inside (0, 1)
    # the two factors cancel only when p is 0 or 1; check those)
    torch.testing.assert_close(
        protocol2_prob(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 0.5, 0.0), torch.tensor([1.0, 0.0])
    )


def test_protocol2_used_by_sampler(monkeypatch) -> None:
    """With protocol 2 the sampler draws from protocol2_prob(p, x_t, t, t') (compare the captured probabilities)."""
    seen = capture_bernoulli(monkeypatch)
    # x0 prediction with logit(0.8) everywhere: p = 0.8
    out = torch.full((1, 2, 3), math.log(0.8 / 0.2))
    net = ConstantDiffusionNet(
        out, config=DiffusionConfig(num_bits=3, num_tokens=2, num_layers=1, num_heads=1, head_dim=4, text_dim=TEXT_DIM)
    )
    feats = text([2], 0, num_layers=1)
    BernoulliDiffusion(prediction="x0").sample(
        net, feats, None, make_generators([5]), num_steps=4, guidance_scale=0.0, protocol=2, rho=1.0
    )
    # steps t = 1, 0.75, 0.5, 0.25, 0; the first three steps sample, the last thresholds
    assert len(seen) == 3
    x_at_075 = net.calls[1][0]
    torch.testing.assert_close(seen[0], protocol2_prob(torch.full_like(x_at_075, 0.8), net.calls[0][0], 1.0, 0.75))
    torch.testing.assert_close(seen[1], protocol2_prob(torch.full_like(x_at_075, 0.8), x_at_075, 0.75, 0.5))
    # by hand for the step t = 0.75 -> t' = 0.5 (s = 0.25), p = 0.8:
    # x_t = 1: (0.8*0.5 + 0.25)(0.75 + 0.125) = 0.65*0.875 = 0.56875 vs (0.2*0.5 + 0.25)*0.125 = 0.04375 -> 0.928571
    # x_t = 0: 0.65*0.125 = 0.08125 vs 0.35*0.875 = 0.30625 -> 0.08125/0.3875 = 0.209677
    for value, expected in ((1.0, 0.56875 / 0.6125), (0.0, 0.08125 / 0.3875)):
        sel = x_at_075 == value
        if sel.any():
            torch.testing.assert_close(seen[1][sel], torch.full((int(sel.sum()),), expected))
    assert [round(float(t[0]), 6) for _, t in net.calls] == [1.0, 0.75, 0.5, 0.25]


# --- time sampling ---------------------------------------------------------------------------------------------
def test_logit_normal_time_sampling() -> None:
    proc = BernoulliDiffusion(time_sampling="logit_normal")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        t = proc.sample_t(20000)
    assert t.shape == (20000,)
    assert bool(((t > 0) & (t < 1)).all())
    assert abs(t.median().item() - 0.5) < 0.02
    # P(t < 0.25) = P(N(0,1) < logit(0.25) = -1.0986) = 0.136 (uniform would give 0.25)
    assert abs((t < 0.25).float().mean().item() - 0.136) < 0.015
    with torch.random.fork_rng():
        torch.manual_seed(1)
        shifted = BernoulliDiffusion(logit_mean=1.0).sample_t(20000)
    assert abs(shifted.median().item() - 0.7311) < 0.02  # sigmoid(1)


def test_uniform_time_sampling() -> None:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        t = BernoulliDiffusion(time_sampling="uniform").sample_t(20000)
    assert bool(((t >= 0) & (t < 1)).all())
    assert abs(t.median().item() - 0.5) < 0.02
    assert abs((t < 0.25).float().mean().item() - 0.25) < 0.015


@pytest.mark.parametrize("time_sampling", ["logit_normal", "uniform"])
def test_time_sampling_per_sample_generators(time_sampling: str) -> None:
    """Per-sample generators: t_i depends only on sample i's generator (not on the batch around it)."""
    proc = BernoulliDiffusion(time_sampling=time_sampling)
    a = proc.sample_t(3, generators=make_generators([3, 4, 5]))
    b = proc.sample_t(3, generators=make_generators([3, 4, 5]))
    c = proc.sample_t(1, generators=make_generators([4]))
    assert torch.equal(a, b) and torch.equal(a[1:2], c)
    assert bool(((a > 0) & (a < 1)).all())
    many = proc.sample_t(2000, generators=make_generators(range(2000)))
    assert abs(many.median().item() - 0.5) < 0.05
