"""The sampling and training math of binlat.processes against hand-computed numbers.

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
from torch import nn

import binlat.processes.diffusion as diffusion_mod
from binlat.generators import ARConfig, ARTransformer, DiffusionConfig, DiffusionTransformer
from binlat.processes import ARDecoding, BernoulliDiffusion
from binlat.processes.common import guide, make_generators
from binlat.processes.diffusion import (
    protocol2_prob,
    q_sample,
    step_protocol1,
    timesteps,
    x0_logits_from_flip,
    x0_prob_from_flip,
)
from binlat.text import TextFeatures

TEXT_DIM = 12
SHARED = dict(num_bits=8, num_tokens=6, num_layers=2, num_heads=2, head_dim=8, text_dim=TEXT_DIM)
CFG, AR_CFG = DiffusionConfig(**SHARED), ARConfig(**SHARED)


# --- helpers --------------------------------------------------------------------------------------------------
def randomise(model: nn.Module, seed: int) -> nn.Module:
    """Overwrite every parameter with N(0, 0.3^2) values, so that zero-initialised parts (adaLN-Zero gates,
    position embeddings) are active and the output depends on text, time and position."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def diff_net() -> DiffusionTransformer:
    torch.manual_seed(0)
    return randomise(DiffusionTransformer(CFG), 1)


@pytest.fixture(scope="module")
def ar_net() -> ARTransformer:
    torch.manual_seed(0)
    return randomise(ARTransformer(AR_CFG), 2)


def text(lengths: list[int], seed: int, num_layers: int = 2) -> TextFeatures:
    """Hand-made features, one [N, L, TEXT_DIM] per block, LEFT padded; padded positions hold garbage
    (nonzero values) on purpose: they must not matter."""
    g = torch.Generator().manual_seed(seed)
    n, length = len(lengths), max(lengths)
    layers = [torch.randn(n, length, TEXT_DIM, generator=g) for _ in range(num_layers)]
    mask = torch.zeros(n, length, dtype=torch.bool)
    for i, k in enumerate(lengths):
        mask[i, length - k :] = True
    return TextFeatures(layers=layers, mask=mask)


def is_binary(x: torch.Tensor) -> bool:
    return bool(((x == 0) | (x == 1)).all())


class ConstantDiffusionNet(nn.Module):
    """Fake diffusion network: returns a fixed tensor (broadcast over the batch) and records its inputs."""

    def __init__(self, out: torch.Tensor | None = None, fn=None, config: DiffusionConfig | None = None):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))
        self.out, self.fn = out, fn
        self.config = config
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x_t, t, layers, mask):
        self.calls.append((x_t.clone(), t.clone()))
        if self.fn is not None:
            return self.fn(x_t, t)
        return self.out.expand(x_t.shape[0], *self.out.shape[1:]).clone()


class ConstantARNet(nn.Module):
    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))
        self.out = out
        self.inputs: list[torch.Tensor | None] = []

    def forward(self, bits, layers, mask, cache=None):
        self.inputs.append(None if bits is None else bits.clone())
        return self.out.clone()


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


def test_bad_process_settings() -> None:
    with pytest.raises(ValueError, match="prediction"):
        BernoulliDiffusion(prediction="eps")
    with pytest.raises(ValueError, match="time_sampling"):
        BernoulliDiffusion(time_sampling="cosine")


def test_one_generator_per_sample_required() -> None:
    with pytest.raises(ValueError, match="generator"):
        step_protocol1(torch.full((2, 1, 1), 0.5), 0.5, make_generators([0]))


# --- self-conditioning ------------------------------------------------------------------------------------------
SC_CFG = DiffusionConfig(
    num_bits=8,
    num_tokens=6,
    num_layers=2,
    num_heads=2,
    head_dim=8,
    text_dim=TEXT_DIM,
    prediction="x0",
    self_condition=True,
)


class EstimateSpyNet(nn.Module):
    """Fake self-conditioned network: x0 logits from a fixed rule of (x_t, t), recording each estimate it reads."""

    def __init__(self, config: DiffusionConfig):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))
        self.config = config
        self.estimates: list[torch.Tensor | None] = []

    def forward(self, x_t, t, layers, mask, estimate=None):
        self.estimates.append(None if estimate is None else estimate.clone())
        return 3.0 * (2 * x_t - 1) * (1 - t.view(-1, 1, 1)) + 0.5


def test_self_conditioning_network_starts_blind_to_the_estimate_and_then_reads_it() -> None:
    torch.manual_seed(0)
    net = DiffusionTransformer(SC_CFG).eval()
    x_t = (torch.rand(2, 6, 8) < 0.5).float()
    t, feats = torch.tensor([0.3, 0.8]), text([3, 5], 0)
    estimate = torch.rand(2, 6, 8)
    with torch.no_grad():
        # zero-initialised: no estimate, an estimate of 1/2 and any estimate give the same logits at first
        blind = net(x_t, t, feats.layers, feats.mask)
        assert torch.equal(blind, net(x_t, t, feats.layers, feats.mask, torch.full_like(x_t, 0.5)))
        assert torch.allclose(blind, net(x_t, t, feats.layers, feats.mask, estimate), atol=1e-6)
    randomise(net, 3)
    with torch.no_grad():
        assert not torch.allclose(
            net(x_t, t, feats.layers, feats.mask), net(x_t, t, feats.layers, feats.mask, estimate)
        )
        # "no estimate" is the estimate 1/2 (the centred input is 0)
        assert torch.allclose(
            net(x_t, t, feats.layers, feats.mask),
            net(x_t, t, feats.layers, feats.mask, torch.full_like(x_t, 0.5)),
            atol=1e-6,
        )
    plain = DiffusionTransformer(CFG)
    with pytest.raises(ValueError, match="self_condition"):
        plain(x_t, t, text([3, 5], 0).layers, feats.mask, estimate)


def test_self_conditioned_sampling_hands_each_step_the_last_estimate() -> None:
    net = EstimateSpyNet(SC_CFG)
    proc = BernoulliDiffusion(prediction="x0", self_condition=True)
    cond, uncond = text([3, 5], 0), text([1], 1)
    seen = []
    real = diffusion_mod.step_protocol1

    def spy(p, t_next, generators):
        seen.append(p.clone())
        return real(p, t_next, generators)

    diffusion_mod.step_protocol1 = spy
    try:
        proc.sample(net, cond, uncond, make_generators([4, 5]), num_steps=4, guidance_scale=2.0, temperature=1.0)
    finally:
        diffusion_mod.step_protocol1 = real
    assert net.estimates[0] is None and len(net.estimates) == 4
    for i in range(1, 4):  # step i reads step i-1's estimate p, for the conditional and the unconditional rows
        assert torch.equal(net.estimates[i], torch.cat((seen[i - 1], seen[i - 1])))
    # without self-conditioning the network is never handed an estimate
    net = EstimateSpyNet(CFG)
    BernoulliDiffusion(prediction="x0").sample(net, cond, uncond, make_generators([4, 5]), num_steps=3)
    assert net.estimates == [None, None, None]


def test_self_conditioned_loss_gives_half_the_samples_their_own_estimate() -> None:
    torch.manual_seed(0)
    net = randomise(DiffusionTransformer(SC_CFG), 4)
    proc = BernoulliDiffusion(prediction="x0", self_condition=True)
    x0 = (torch.rand(16, 6, 8, generator=torch.Generator().manual_seed(1)) < 0.5).float()
    feats = text([3] * 16, 2)
    calls = []
    real_forward = net.forward

    def spy(x_t, t, layers, mask, estimate=None):
        out = real_forward(x_t, t, layers, mask, estimate)
        calls.append((x_t.shape[0], None if estimate is None else estimate.clone(), out.detach()))
        return out

    net.forward = spy
    seeds = list(range(16))
    loss, metrics = proc.loss(net, x0, feats, make_generators(seeds))
    (rows, first_estimate, first_out), (n, estimate, _) = calls
    assert first_estimate is None and n == 16 and 0 < rows < 16  # the estimate pass runs on the chosen rows only
    estimated = (estimate != 0.5).any(dim=(1, 2))
    assert int(estimated.sum()) == rows
    assert torch.allclose(estimate[estimated], torch.sigmoid(first_out))  # the network's own x0 probability
    assert bool((estimate[~estimated] == 0.5).all())
    loss.backward()  # the estimate carries no gradient; the second pass does
    again, _ = proc.loss(net, x0, feats, make_generators(seeds))
    assert torch.equal(loss.detach(), again.detach())  # every draw comes from the samples' own generators


def test_pooled_text_modulates_every_block_and_ignores_padding() -> None:
    cfg = DiffusionConfig(
        num_bits=8,
        num_tokens=6,
        num_layers=2,
        num_heads=2,
        head_dim=8,
        text_dim=TEXT_DIM,
        prediction="x0",
        pooled_text=True,
    )
    torch.manual_seed(0)
    net = randomise(DiffusionTransformer(cfg), 6)
    x_t, t = (torch.rand(2, 6, 8) < 0.5).float(), torch.tensor([0.4, 0.7])
    feats = text([3, 5], 0)
    with torch.no_grad():
        out = net(x_t, t, feats.layers, feats.mask)
        # padding holds garbage in `text`: other garbage gives the same logits
        noisy = [layer.masked_fill(~feats.mask[..., None], 7.0) for layer in feats.layers]
        assert torch.allclose(out, net(x_t, t, noisy, feats.mask), atol=1e-5)
        # the pooled path alone carries the last layer's text: without attention to text the output still moves
        for block in net.blocks:
            block.text_proj.weight.zero_()
            block.text_proj.bias.fill_(0.0)
        other = text([3, 5], 1)
        blind = net(x_t, t, [feats.layers[0], other.layers[1]], feats.mask)
        assert not torch.allclose(net(x_t, t, feats.layers, feats.mask), blind)
