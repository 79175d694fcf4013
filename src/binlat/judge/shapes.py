"""Compositional judge for the ``shapes`` domain (steps 1-5 of shapes-spec.md).

Pixels snap to the nearest palette colour, 8-connected single-colour blobs
become objects, each blob's shape is read from its mask, and the object set is
compared with what the caption asks for.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
from PIL import Image

from binlat.data.shapes import COLORS, MIN_SIZE_FRAC, PALETTE, parse_caption, relation_holds

COLOR_THRESHOLD = 80.0
MIN_AREA_FRACTION = 0.25
SQUARE_CORNER_SHARE = 0.6
TRIANGLE_LOWER_SHARE = 0.62
_PALETTE_ARRAY = np.array([PALETTE[c] for c in COLORS], dtype=np.int32)


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected an [H, W, 3] uint8 array, got {arr.shape} {arr.dtype}")
    return arr


def palette_labels(arr: np.ndarray) -> np.ndarray:
    """Step 1: index of the nearest palette colour per pixel, -1 for background."""
    diff = arr[:, :, None, :].astype(np.int32) - _PALETTE_ARRAY[None, None]
    dist2 = (diff * diff).sum(axis=-1)
    nearest = dist2.argmin(axis=-1)
    return np.where(dist2.min(axis=-1) < COLOR_THRESHOLD**2, nearest, -1)


def connected_components(mask: np.ndarray) -> np.ndarray:
    """8-connected labelling of a boolean mask; each label is the smallest flat pixel
    index of its component, background is -1.

    Labels spread as a 3x3 minimum within the mask; pointer jumping (a label is a
    pixel index, so look up that pixel's own label) makes it converge in ~log steps.
    """
    h, w = mask.shape
    none = h * w  # larger than every pixel index
    labels = np.where(mask, np.arange(h * w).reshape(h, w), none)
    while True:
        padded = np.pad(labels, 1, constant_values=none)
        new = labels
        for dy, dx in itertools.product(range(3), range(3)):
            new = np.minimum(new, padded[dy : dy + h, dx : dx + w])
        new = np.where(mask, new, none)
        flat = new.ravel()
        fg = flat < none
        flat[fg] = flat[flat[fg]]
        if np.array_equal(new, labels):
            return np.where(mask, new, -1)
        labels = new


def classify_shape(mask: np.ndarray) -> str:
    """Step 3 on a mask cropped to its bounding box."""
    h, w = mask.shape
    # max(1, .) keeps a 1-2 px thin blob from giving empty cells (round(h/4) == 0).
    ch, cw = max(1, round(h / 4)), max(1, round(w / 4))
    corners = (mask[:ch, :cw], mask[:ch, -cw:], mask[-ch:, :cw], mask[-ch:, -cw:])
    if np.mean([c.mean() for c in corners]) >= SQUARE_CORNER_SHARE:
        return "square"
    rows = mask.sum(axis=1).astype(np.float64)
    lower = rows[(h + 1) // 2 :].sum() + (0.5 * rows[h // 2] if h % 2 else 0.0)
    if lower >= TRIANGLE_LOWER_SHARE * rows.sum():
        return "triangle"
    return "circle"


def detect_objects(image: Image.Image | np.ndarray) -> list[dict[str, Any]]:
    """Steps 1-3: objects as dicts of shape, color, bbox (x0, y0, x1, y1; x1, y1
    exclusive), cx, cy (bounding-box centre in pixel coordinates) and area (pixels)."""
    arr = _as_array(image)
    size = min(arr.shape[:2])
    min_area = MIN_AREA_FRACTION * 0.5 * (MIN_SIZE_FRAC * size) ** 2
    colour_of = palette_labels(arr)
    objects: list[dict[str, Any]] = []
    for ci, colour in enumerate(COLORS):
        mask = colour_of == ci
        if not mask.any():
            continue
        labels = connected_components(mask)
        ids, areas = np.unique(labels[mask], return_counts=True)
        for label, area in zip(ids, areas):
            if area < min_area:
                continue  # speck
            ys, xs = np.nonzero(labels == label)
            x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
            crop = labels[y0:y1, x0:x1] == label
            objects.append(
                {
                    "shape": classify_shape(crop),
                    "color": colour,
                    "bbox": (x0, y0, x1, y1),
                    "cx": (x0 + x1) / 2,
                    "cy": (y0 + y1) / 2,
                    "area": int(area),
                }
            )
    objects.sort(key=lambda o: (o["cy"], o["cx"]))
    return objects


def _describe(objects: list[dict[str, Any]]) -> str:
    return ", ".join(f"{o['color']} {o['shape']} at ({o['cx']:.1f}, {o['cy']:.1f})" for o in objects) or "nothing"


# Each relation's opposite: "A above B" drawn as "A below B" is a reversal (the roles swapped), not a layout error.
OPPOSITE = {
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "above": "below",
    "below": "above",
}


def judge(image: Image.Image | np.ndarray, caption: str) -> dict[str, Any]:
    """Step 5: whether the detected objects match the caption's scene exactly.

    Returns ``{"correct", "reason", "failure", "category", "objects"}``; ``failure`` names why an image failed, in
    the order the judge checks: "count" (wrong number of objects), "attributes" (shapes or colours), "reversed"
    (the objects are right and the opposite relation holds: "A above B" drawn as B above A) or "axis" (right objects,
    neither the relation nor its opposite); None when correct.
    """
    want = parse_caption(caption)
    objects = detect_objects(image)
    need, relation = want["objects"], want["relation"]
    result = {"correct": False, "category": want["category"], "objects": objects}
    if len(objects) != len(need):
        return result | {
            "reason": f"expected {len(need)} objects, found {len(objects)}: {_describe(objects)}",
            "failure": "count",
        }
    attributes_matched, opposite_holds = False, False
    # At most 4 objects, so trying every assignment is cheap and handles any order.
    for perm in itertools.permutations(objects):
        if not all(
            o["shape"] == w["shape"] and (w["color"] is None or o["color"] == w["color"]) for o, w in zip(perm, need)
        ):
            continue
        attributes_matched = True
        if relation is None:
            return result | {"correct": True, "reason": "ok", "failure": None}
        a, b = (perm[0]["cx"], perm[0]["cy"]), (perm[1]["cx"], perm[1]["cy"])
        if relation_holds(relation, a, b):
            return result | {"correct": True, "reason": "ok", "failure": None}
        opposite_holds = opposite_holds or relation_holds(OPPOSITE[relation], a, b)
    if attributes_matched:
        how = "reversed" if opposite_holds else "wrong axis"
        return result | {
            "reason": f"relation '{relation}' does not hold ({how}): {_describe(objects)}",
            "failure": "reversed" if opposite_holds else "axis",
        }
    return result | {"reason": f"shapes/colours do not match: {_describe(objects)}", "failure": "attributes"}
