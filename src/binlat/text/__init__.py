"""Frozen text encoders that feed per-layer features to the generators."""

from binlat.text.encoder import (
    DEFAULT_TEXT_ENCODER,
    TextEncoder,
    TextFeatures,
    resolve_text_encoder_path,
    text_layer_map,
)

__all__ = [
    "DEFAULT_TEXT_ENCODER",
    "TextEncoder",
    "TextFeatures",
    "resolve_text_encoder_path",
    "text_layer_map",
]
