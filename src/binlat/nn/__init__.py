"""Transformer building blocks shared by the tokenizer and both generators."""

from .attention import Attention, KVCache, StaticKVCache, attention_mask
from .checkpointing import run_block
from .mlp import GeluMLP, PooledTextEmbedding, SwiGLU, TimestepEmbedding
from .norms import AdaLNContinuous, AdaLNZero, RMSNorm, layer_norm, modulate
from .positions import sincos_grid_positions, sincos_positions
from .rotary import apply_rotary, rope_1d, rotary_tables
from .text_refiner import TextRefiner

__all__ = [
    "run_block",
    "Attention",
    "KVCache",
    "StaticKVCache",
    "attention_mask",
    "GeluMLP",
    "PooledTextEmbedding",
    "SwiGLU",
    "TimestepEmbedding",
    "AdaLNContinuous",
    "AdaLNZero",
    "RMSNorm",
    "layer_norm",
    "modulate",
    "apply_rotary",
    "rope_1d",
    "rotary_tables",
    "sincos_grid_positions",
    "sincos_positions",
    "TextRefiner",
]
