"""Generator networks over binary tokens (networks only; sampling lives in binlat.processes)."""

from .ar import ARCache, ARTransformer
from .config import ARConfig, DiffusionConfig, GeneratorConfig
from .diffusion import DiffusionTransformer

__all__ = ["GeneratorConfig", "DiffusionConfig", "ARConfig", "DiffusionTransformer", "ARTransformer", "ARCache"]
