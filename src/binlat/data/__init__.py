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

# Real-image datasets (image folders, manifests, WebDataset shards) and the data SPEC.
from binlat.data.readers import (  # noqa: E402
    IMAGE_EXTENSIONS,
    ImageFolderDataset,
    ManifestDataset,
    WebDatasetShards,
    collate,
    make_dataset,
)
from binlat.data.transforms import ImageLoadError, ImageTransform, load_image  # noqa: E402

__all__ += [
    "IMAGE_EXTENSIONS",
    "ImageFolderDataset",
    "ImageLoadError",
    "ImageTransform",
    "ManifestDataset",
    "WebDatasetShards",
    "collate",
    "load_image",
    "make_dataset",
]
