"""What a diffusion network reads besides x_t, t and its attention to the text: its own last estimate
(self-conditioning: blind to it at first, handed the last step's estimate when sampling, and half the samples'
own estimate in the loss) and the pooled text (modulating every block, padding ignored)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch import nn

import binlat.processes.diffusion as diffusion_mod
from binlat.generators import DiffusionConfig, DiffusionTransformer
from binlat.processes import BernoulliDiffusion
from binlat.processes.common import make_generators
from processes_support import CFG, TEXT_DIM, randomise, text

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
