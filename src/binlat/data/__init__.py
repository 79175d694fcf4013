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
    "parse_caption",
    "prompt_set",
    "render",
    "sample_scene",
    "scene_for_caption",
]

# Real-image datasets (image folders, manifests, WebDataset shards), the data SPEC, and the one collate_fn.
from binlat.data.collate import collate  # noqa: E402
from binlat.data.readers import (  # noqa: E402
    IMAGE_EXTENSIONS,
    ImageFolderDataset,
    ManifestDataset,
    WebDatasetShards,
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
