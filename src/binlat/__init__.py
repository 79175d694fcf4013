"""binlat: text-to-image generation in a 1D binary latent space."""

from .generators import ARConfig, ARTransformer, DiffusionConfig, DiffusionTransformer, GeneratorConfig
from .tokenizer import BinaryTokenizer, TokenizerConfig

__version__ = "0.1.0"

__all__ = [
    "BinaryTokenizer",
    "TokenizerConfig",
    "DiffusionTransformer",
    "ARTransformer",
    "DiffusionConfig",
    "ARConfig",
    "GeneratorConfig",
    "__version__",
]
