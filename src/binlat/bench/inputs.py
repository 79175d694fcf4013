"""What the comparisons feed the networks: random networks and a fixed random 'prompt' of the right shape."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ..modeling import Network
from .plan import TEXT_LENGTH, TEXT_REAL, UNCOND_REAL

if TYPE_CHECKING:
    from .plan import Plan


def text_features(batch: int, layers: int, dim: int, length: int = TEXT_LENGTH, real: int = TEXT_REAL, seed: int = 1):
    """A fixed random 'prompt': one [batch, length, dim] state per layer (the same text in every row), left-padded
    with `real` real tokens at the end."""
    from ..text import TextFeatures

    rng = torch.Generator().manual_seed(seed)
    states = [torch.randn(1, length, dim, generator=rng).expand(batch, -1, -1).contiguous() for _ in range(layers)]
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[:, length - real :] = True
    return TextFeatures(states, mask)


def prompt_pair(plan: Plan, batch: int, layers: int | None = None):
    g = plan.generator
    layers = g["num_layers"] if layers is None else layers
    return (
        text_features(batch, layers, g["text_dim"], plan.text_length, TEXT_REAL, seed=1),
        text_features(1, layers, g["text_dim"], plan.text_length, UNCOND_REAL, seed=2),
    )


def gen_config(plan: Plan, kind: str, **overrides):
    """Generator `kind`'s config at the plan's body size, with `overrides`: what the comparisons time (other token
    grids and widths, against the release's sampler), so without the preset's own options, which may not fit another
    grid (a grouped AR head's groups are sized for the preset's bits). The shipped-recipe tables (5, 8) build with
    Plan.generator_fields instead."""
    from ..registry import generator

    return generator(kind).config(**{**plan.generator, **overrides})


def seeded(build: Callable[[], Network], seed: int = 0) -> Network:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build().eval()


def diffusion_network(config, seed: int = 0) -> Network:
    """A random DiffusionTransformer whose adaLN-Zero layers are random too: freshly initialised they are zero,
    every block is then the identity, and output-level comparisons (bf16 agreement) would only see the
    embedding and output layers. Timing is the same either way."""
    from ..generators import DiffusionTransformer

    net = seeded(lambda: DiffusionTransformer(config), seed)
    rng = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for block in net.blocks:
            block.adaln.linear.weight.copy_(torch.randn(block.adaln.linear.weight.shape, generator=rng) * 0.02)
    return net


def efficiency_step(plan: Plan, batch: int, **overrides):
    """The batched step of tables 4 and 7: (config, network, inputs) at the paper's token count."""
    config = gen_config(plan, "diffusion", num_tokens=plan.paper_tokens, **overrides)
    net = diffusion_network(config)
    cond = text_features(batch, config.num_layers, config.text_dim, plan.text_length)
    rng = torch.Generator().manual_seed(0)
    x = (torch.rand(batch, config.num_tokens, config.num_bits, generator=rng) < 0.5).float()
    t = torch.rand(batch, generator=rng)
    return config, net, (x, t, cond.layers, cond.mask)
