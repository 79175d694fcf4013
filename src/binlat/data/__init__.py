"""Built-in data: the procedural ``shapes`` text-to-image domain."""

from binlat.data.shapes import (
    CATEGORIES,
    HELD_OUT,
    PALETTE,
    RELATIONS,
    SHAPES,
    Scene,
    ShapeObject,
    ShapesStream,
    collate_samples,
    parse_caption,
    prompt_set,
    render,
    sample_scene,
    scene_for_caption,
)

__all__ = [
    "CATEGORIES",
    "HELD_OUT",
    "PALETTE",
    "RELATIONS",
    "SHAPES",
    "Scene",
    "ShapeObject",
    "ShapesStream",
    "collate_samples",
    "parse_caption",
    "prompt_set",
    "render",
    "sample_scene",
    "scene_for_caption",
]
