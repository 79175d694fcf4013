"""What the network test files (tests/test_networks_*.py) share: a tiny tokenizer config, weights nudged off their
initialisation, and random bits."""

from __future__ import annotations

import torch

from binlat.tokenizer import TokenizerConfig


def randomize(module: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * std)
    return module


def tiny_tokenizer_config(**kw) -> TokenizerConfig:
    base = dict(
        in_channels=3,
        patch_size=4,
        num_tokens=4,
        num_bits=8,
        encoder_layers=2,
        encoder_heads=2,
        encoder_head_dim=8,
        decoder_layers=2,
        decoder_heads=2,
        decoder_head_dim=8,
        rope_axes_dims=(2, 2, 4),
        downsample_after=(0,),
        upsample_after=(0,),
        image_size=16,
    )
    base.update(kw)
    return TokenizerConfig(**base)


def bits(n: int, k: int, b: int) -> torch.Tensor:
    return torch.randint(0, 2, (n, k, b)).float()
