"""Binary tokenizer: images <-> K x B bits."""

from .config import TokenizerConfig
from .model import BinaryTokenizer, TokenizerOutput, bit_regularizer, token_positions

__all__ = ["TokenizerConfig", "BinaryTokenizer", "TokenizerOutput", "bit_regularizer", "token_positions"]
