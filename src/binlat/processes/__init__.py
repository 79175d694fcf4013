"""Sampling and training processes over binary tokens (the math; the networks live in binlat.generators)."""

from .ar import ARDecoding
from .diffusion import BernoulliDiffusion

__all__ = ["BernoulliDiffusion", "ARDecoding"]
