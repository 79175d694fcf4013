"""The procedural ``shapes`` text-to-image domain.

Scenes hold 1-4 filled circles, squares and triangles on a white canvas and
carry a caption of one of six GenEval-like categories. The normative spec is
``shapes-spec.md``; everything here is deterministic given a numpy Generator,
so a training stream can be resumed at any sample index.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import IterableDataset, get_worker_info

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 60, 220),
    "yellow": (235, 195, 0),
    "purple": (140, 40, 180),
    "black": (25, 25, 25),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
CATEGORIES: tuple[str, ...] = ("single", "colors", "two", "counting", "position", "color_attr")
RELATIONS: tuple[str, ...] = ("to the left of", "to the right of", "above", "below")
# Each relation's converse: "A above B" says what "B below A" says.
CONVERSE: dict[str, str] = {
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "above": "below",
    "below": "above",
}
HELD_OUT: frozenset[tuple[str, str]] = frozenset({("yellow", "triangle"), ("purple", "circle")})
COUNT_WORDS: dict[int, str] = {2: "two", 3: "three", 4: "four"}
PREFIX = "a photo of "
SUFFIX = " on a white background"
BACKGROUND: tuple[int, int, int] = (255, 255, 255)

MIN_CANVAS, MAX_CANVAS = 32, 512
MIN_SIZE_FRAC, MAX_SIZE_FRAC = 0.18, 0.30
MIN_GAP_PX = 2.0
RELATION_MARGIN_FRAC = 0.2
# Anti-aliasing can tint one pixel beyond a box's edge on each side; keeping that
# fringe out of the gap means even the rendered non-white footprints are >= 2 px apart.
_AA_FRINGE_PX = 1.0
_MIN_BOX_GAP = MIN_GAP_PX + 2 * _AA_FRINGE_PX  # between two boxes as the sampler places them
# The judge measures centres on thresholded pixels, which can move a centre by ~1 px
# (e.g. a triangle's thin apex vanishes); the dominant axis beats the other by this
# much so a ground-truth render never flips to a neighbouring relation.
_AXIS_MARGIN_PX = 4.0
_SUPERSAMPLE = 4
_MAX_PLACEMENT_TRIES = 10_000


@dataclass(frozen=True)
class ShapeObject:
    """One filled shape; (cx, cy) is its bounding-box centre in pixels, size its side d."""

    shape: str
    color: str
    cx: float
    cy: float
    size: float

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        h = self.size / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)


@dataclass(frozen=True)
class Scene:
    size: int
    objects: tuple[ShapeObject, ...]
    caption: str
    category: str
    relation: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "objects": [asdict(o) for o in self.objects],
            "caption": self.caption,
            "category": self.category,
            "relation": self.relation,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        objs = tuple(ShapeObject(**o) for o in d["objects"])
        return cls(int(d["size"]), objs, d["caption"], d["category"], d.get("relation"))


# ---------------------------------------------------------------- relations


def relation_holds(
    relation: str,
    a: tuple[float, float],
    b: tuple[float, float],
    min_offset: float = 0.0,
    axis_margin: float = 0.0,
) -> bool:
    """Whether ``A relation B`` holds for centres a, b (spec definitions when margins are 0)."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    if relation == "to the left of":
        main, other = dx, dy
    elif relation == "to the right of":
        main, other = -dx, dy
    elif relation == "above":
        main, other = dy, dx
    elif relation == "below":
        main, other = -dy, dx
    else:
        raise ValueError(f"unknown relation {relation!r}")
    return main > 0 and main >= min_offset and main >= abs(other) + axis_margin


def box_gap(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Distance between two (x0, y0, x1, y1) boxes along their best-separating axis."""
    return max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])


# ---------------------------------------------------------------- captions

_SHAPE_RE = "(circle|square|triangle)"
_COLOR_RE = f"({'|'.join(COLORS)})"
_REL_RE = f"({'|'.join(RELATIONS)})"
_CAPTION_FORMS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (cat, re.compile(f"^{pat}$"))
    for cat, pat in (
        ("single", f"a {_SHAPE_RE}"),
        ("colors", f"a {_COLOR_RE} {_SHAPE_RE}"),
        ("two", f"a {_SHAPE_RE} and a {_SHAPE_RE}"),
        ("counting", f"(two|three|four) {_SHAPE_RE}s"),
        ("position", f"a {_SHAPE_RE} {_REL_RE} a {_SHAPE_RE}"),
        ("color_attr", f"a {_COLOR_RE} {_SHAPE_RE} and a {_COLOR_RE} {_SHAPE_RE}"),
    )
)


def _obj(shape: str, color: str | None = None) -> dict[str, str | None]:
    return {"shape": shape, "color": color}


def parse_caption(caption: str) -> dict[str, Any]:
    """Parse a caption of any category form into what its scene must hold.

    Returns ``{"category", "objects": [{"shape", "color" (None if unnamed)}], "relation"}``;
    for ``position`` objects[0] is A and objects[1] is B in ``A relation B``.
    """
    text = " ".join(caption.lower().split()).rstrip(".")
    if text.startswith(PREFIX):
        text = text[len(PREFIX) :]
    if text.endswith(SUFFIX):
        text = text[: -len(SUFFIX)]
    for category, pattern in _CAPTION_FORMS:
        m = pattern.match(text)
        if m is None:
            continue
        g = m.groups()
        relation = None
        if category == "single":
            objects = [_obj(g[0])]
        elif category == "colors":
            objects = [_obj(g[1], g[0])]
        elif category == "two":
            objects = [_obj(g[0]), _obj(g[1])]
        elif category == "counting":
            n = {w: k for k, w in COUNT_WORDS.items()}[g[0]]
            objects = [_obj(g[1]) for _ in range(n)]
        elif category == "position":
            objects, relation = [_obj(g[0]), _obj(g[2])], g[1]
        else:
            objects = [_obj(g[1], g[0]), _obj(g[3], g[2])]
        if category in ("two", "position", "color_attr") and objects[0]["shape"] == objects[1]["shape"]:
            raise ValueError(f"caption {caption!r}: the two shapes must differ")
        if category == "color_attr" and objects[0]["color"] == objects[1]["color"]:
            raise ValueError(f"caption {caption!r}: the two colours must differ")
        return {"category": category, "objects": objects, "relation": relation}
    raise ValueError(
        f"caption {caption!r} matches no shapes caption form "
        "(a {shape} | a {color} {shape} | a {shape} and a {shape} | {two,three,four} {shape}s | "
        "a {shape} {relation} a {shape} | a {color} {shape} and a {color} {shape})"
    )


def format_caption(content: dict[str, Any]) -> str:
    """Inverse of :func:`parse_caption` (without prefix or suffix)."""
    cat, objs = content["category"], content["objects"]
    names = [f"{o['color']} {o['shape']}" if o["color"] else o["shape"] for o in objs]
    if cat in ("single", "colors"):
        return f"a {names[0]}"
    if cat in ("two", "color_attr"):
        return f"a {names[0]} and a {names[1]}"
    if cat == "counting":
        return f"{COUNT_WORDS[len(objs)]} {objs[0]['shape']}s"
    if cat == "position":
        return f"a {names[0]} {content['relation']} a {names[1]}"
    raise ValueError(f"unknown category {cat!r}")


def names_held_out(content: dict[str, Any]) -> bool:
    return any((o["color"], o["shape"]) in HELD_OUT for o in content["objects"])


# ---------------------------------------------------------------- sampling


def _allowed_colors(shape: str, exclude_held_out: bool) -> list[str]:
    return [c for c in COLORS if not (exclude_held_out and (c, shape) in HELD_OUT)]


def _pick(rng: np.random.Generator, seq: list[Any] | tuple[Any, ...]) -> Any:
    return seq[int(rng.integers(len(seq)))]


# The relations that put the caption's first noun on top or on the left ("A above B"); their converses put it second.
LEADING_RELATIONS: tuple[str, ...] = ("above", "to the left of")


def _position_relation(rng: np.random.Generator, above_left: float | None) -> str:
    """A position caption's relation: uniform over RELATIONS (the spec's draw), or with `above_left` that share
    from LEADING_RELATIONS and the rest from their converses (uniform within each pair)."""
    if above_left is None:
        return _pick(rng, RELATIONS)
    leading = rng.random() < above_left
    return _pick(rng, LEADING_RELATIONS if leading else tuple(CONVERSE[r] for r in LEADING_RELATIONS))


def _random_content(
    rng: np.random.Generator, category: str, exclude_held_out: bool, above_left: float | None = None
) -> dict[str, Any]:
    relation = None
    two_shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))[:2]]
    if category == "single":
        objects = [_obj(_pick(rng, SHAPES))]
    elif category == "colors":
        pairs = [(c, s) for s in SHAPES for c in _allowed_colors(s, exclude_held_out)]
        c, s = _pick(rng, pairs)
        objects = [_obj(s, c)]
    elif category == "two":
        objects = [_obj(s) for s in two_shapes]
    elif category == "counting":
        n, s = _pick(rng, tuple(COUNT_WORDS)), _pick(rng, SHAPES)
        objects = [_obj(s) for _ in range(n)]
    elif category == "position":
        objects, relation = [_obj(s) for s in two_shapes], _position_relation(rng, above_left)
    elif category == "color_attr":
        c1 = _pick(rng, _allowed_colors(two_shapes[0], exclude_held_out))
        c2 = _pick(rng, [c for c in _allowed_colors(two_shapes[1], exclude_held_out) if c != c1])
        objects = [_obj(two_shapes[0], c1), _obj(two_shapes[1], c2)]
    else:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    return {"category": category, "objects": objects, "relation": relation}


def _sampled_relation_holds(relation: str, first: tuple[float, float], second: tuple[float, float], size: int) -> bool:
    """The sampler's test of ``first relation second`` on a canvas of ``size``: with its margins, stricter than the
    judge's, so a drawn scene is judged right."""
    return relation_holds(relation, first, second, RELATION_MARGIN_FRAC * size, _AXIS_MARGIN_PX)


def _place(rng: np.random.Generator, size: int, sides: list[float], relation: str | None) -> list[tuple[float, float]]:
    """Rejection-sample centres so boxes are inside, apart, and (if given) related."""
    for _ in range(_MAX_PLACEMENT_TRIES):
        centres: list[tuple[float, float]] = []
        boxes: list[tuple[float, float, float, float]] = []
        for d in sides:
            for _ in range(100):
                cx, cy = rng.uniform(d / 2, size - d / 2, size=2)
                box = (cx - d / 2, cy - d / 2, cx + d / 2, cy + d / 2)
                if all(box_gap(box, other) >= _MIN_BOX_GAP for other in boxes):
                    break
            else:
                break  # crowded: restart the whole layout
            centres.append((float(cx), float(cy)))
            boxes.append(box)
        else:
            if relation is None or _sampled_relation_holds(relation, centres[0], centres[1], size):
                return centres
    raise RuntimeError(f"could not place {len(sides)} objects on a {size}px canvas")


def _check_size(size: int) -> None:
    if not MIN_CANVAS <= size <= MAX_CANVAS:
        raise ValueError(f"canvas size {size} outside {MIN_CANVAS}..{MAX_CANVAS}")


def _build_scene(
    content: dict[str, Any], caption: str, rng: np.random.Generator, size: int, exclude_held_out: bool
) -> Scene:
    _check_size(size)
    # Unnamed colours are drawn per object; the held-out filter applies to them too.
    colors = [o["color"] or _pick(rng, _allowed_colors(o["shape"], exclude_held_out)) for o in content["objects"]]
    # Sides are drawn once, before placement, so rejection never biases d away from uniform.
    sides = [float(rng.uniform(MIN_SIZE_FRAC * size, MAX_SIZE_FRAC * size)) for _ in colors]
    centres = _place(rng, size, sides, content["relation"])
    objects = tuple(
        ShapeObject(o["shape"], c, cx, cy, d) for o, c, (cx, cy), d in zip(content["objects"], colors, centres, sides)
    )
    return Scene(size, objects, caption, content["category"], content["relation"])


def _normalised_weights(weights: dict[str, float] | None) -> np.ndarray:
    if weights is None:
        return np.full(len(CATEGORIES), 1 / len(CATEGORIES))
    unknown = set(weights) - set(CATEGORIES)
    if unknown:
        raise ValueError(f"unknown categories {sorted(unknown)}; expected some of {CATEGORIES}")
    w = np.array([float(weights.get(c, 0.0)) for c in CATEGORIES])
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError("category weights must be non-negative with a positive sum")
    return w / w.sum()


def sample_scene(
    rng: np.random.Generator,
    size: int = 64,
    category: str | None = None,
    exclude_held_out: bool = True,
    category_weights: dict[str, float] | None = None,
    prefix_suffix_prob: float = 0.1,
    above_left: float | None = None,
) -> Scene:
    """Draw a caption of some category and a scene that satisfies it; `above_left`: see ShapesStream."""
    if category is None:
        category = CATEGORIES[int(rng.choice(len(CATEGORIES), p=_normalised_weights(category_weights)))]
    content = _random_content(rng, category, exclude_held_out, above_left)
    caption = format_caption(content)
    if rng.random() < prefix_suffix_prob:
        caption = PREFIX + caption
    if rng.random() < prefix_suffix_prob:
        caption = caption + SUFFIX
    return _build_scene(content, caption, rng, size, exclude_held_out)


def said_other_way(scene: Scene) -> Scene:
    """A position scene with its caption said the other way round (:func:`other_way`): the same objects in the same
    places, so the same picture, listed in the new caption's order with the converse relation."""
    if scene.relation is None:
        raise ValueError(f"not a position scene: {scene.caption!r}")
    return Scene(scene.size, scene.objects[::-1], other_way(scene.caption), scene.category, CONVERSE[scene.relation])


def _layout_holds(size: int, boxes: list[ShapeObject], relation: str) -> bool:
    """Whether two objects keep the sampler's rules: inside the canvas, apart, and ``boxes[0] relation boxes[1]``
    with its margins."""
    first, second = boxes
    inside = all(o.size / 2 <= v <= size - o.size / 2 for o in boxes for v in (o.cx, o.cy))
    apart = box_gap(first.bbox, second.bbox) >= _MIN_BOX_GAP
    related = _sampled_relation_holds(relation, (first.cx, first.cy), (second.cx, second.cy), size)
    return inside and apart and related


def _exchanged_places(scene: Scene, relation: str) -> tuple[ShapeObject, ShapeObject] | None:
    """The two objects of a position scene "A ``relation`` B" with their places exchanged, listed B then A: B centred
    where A was and A where B was, each pushed back inside the canvas where its size needs it (at most half the
    difference of the two sizes, 0.06 S), or None where that breaks the sampler's rules."""
    a, b = scene.objects

    def centred(o: ShapeObject, x: float, y: float) -> ShapeObject:
        h = o.size / 2
        return ShapeObject(o.shape, o.color, min(max(x, h), scene.size - h), min(max(y, h), scene.size - h), o.size)

    moved = (centred(b, a.cx, a.cy), centred(a, b.cx, b.cy))
    return moved if _layout_holds(scene.size, list(moved), relation) else None


def swapped_roles(scene: Scene, rng: np.random.Generator) -> Scene:
    """A position scene "A relation B" turned into "B relation A" (:func:`swap_roles`: the same words, the roles
    reversed) and a picture that shows it: A and B keep their shapes, colours and sizes and exchange places
    (:func:`_exchanged_places`). The relation depends only on the centres, which the exchange swaps, and the gap
    between two boxes only on the sum of their sizes, so the rules break only where the larger object, pushed
    back inside the canvas, comes too close to the other or loses a margin (about 3 scenes in 1,000 at 64 px); then
    B and A are placed afresh for "B relation A" by the sampler's own placement from ``rng``, which is not drawn from
    otherwise."""
    if scene.relation is None:
        raise ValueError(f"not a position scene: {scene.caption!r}")
    moved = _exchanged_places(scene, scene.relation)
    if moved is None:
        b, a = scene.objects[1], scene.objects[0]
        (bx, by), (ax, ay) = _place(rng, scene.size, [b.size, a.size], scene.relation)
        moved = (
            ShapeObject(b.shape, b.color, bx, by, b.size),
            ShapeObject(a.shape, a.color, ax, ay, a.size),
        )
    return Scene(scene.size, moved, swap_roles(scene.caption), scene.category, scene.relation)


def scene_for_caption(caption: str, rng: np.random.Generator, size: int = 64, exclude_held_out: bool = False) -> Scene:
    """A random scene matching any valid caption (ValueError if it cannot be parsed).

    ``exclude_held_out`` only restricts the colours drawn for unnamed objects.
    """
    return _build_scene(parse_caption(caption), caption, rng, size, exclude_held_out)


# ---------------------------------------------------------------- rendering


def render(scene: Scene) -> Image.Image:
    """Render at 4x and box-downsample: anti-aliased edges, exact palette interiors."""
    k, s = _SUPERSAMPLE, scene.size
    hi = Image.new("RGB", (s * k, s * k), BACKGROUND)
    draw = ImageDraw.Draw(hi)
    for o in scene.objects:
        x0, y0, x1, y1 = (round(v * k) for v in o.bbox)
        fill = PALETTE[o.color]
        if o.shape == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif o.shape == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif o.shape == "triangle":
            draw.polygon([(x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1 - 1) / 2, y0)], fill=fill)
        else:
            raise ValueError(f"unknown shape {o.shape!r}")
    # Integer block mean: a block of one colour keeps that colour exactly.
    blocks = np.asarray(hi, dtype=np.uint16).reshape(s, k, s, k, 3).sum(axis=(1, 3))
    return Image.fromarray(((blocks + k * k // 2) // (k * k)).astype(np.uint8), "RGB")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> float tensor [3, H, W] in [-1, 1]."""
    arr = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32).copy())
    return arr.permute(2, 0, 1) / 127.5 - 1.0


def to_image(tensor: torch.Tensor) -> Image.Image:
    """Float tensor [3, H, W] in [-1, 1] -> RGB image."""
    arr = ((tensor.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte()
    return Image.fromarray(arr.permute(1, 2, 0).cpu().numpy(), "RGB")


# ---------------------------------------------------------------- streams and prompts


class ShapesStream(IterableDataset):
    """Infinite, seed-deterministic stream of ``{"image", "caption", "scene"}`` samples.

    Sample ``i`` depends only on (seed, i), so setting ``start_index`` resumes a run;
    DataLoader workers take the indices congruent to their id modulo their count.
    Batch with ``collate_fn=binlat.data.collate.collate`` (it lists the scenes, whose
    object counts vary).

    ``both_ways`` and ``role_pairs`` (at most one) pair the samples up by index: sample
    ``2k`` is drawn as without them, and when it is a position scene, sample ``2k + 1`` is
    its partner rather than a draw of its own. With ``both_ways`` the partner is the same
    scene, the same picture, said the other way round (:func:`said_other_way`: "B below A"
    for "A above B"); with ``role_pairs`` it is the minimal pair for word order, the same
    words with the roles reversed and A and B exchanging places (:func:`swapped_roles`:
    "B above A"). Sample ``2k + 1`` re-derives sample ``2k`` from that sample's own
    generator, so both stay functions of (seed, index). Position scenes then make up
    p(3 - p)/2 of the stream rather than p (0.24 rather than 1/6 with equal weights),
    half of them partners. The training loop reads contiguous index ranges, so a pair meets
    in one micro-batch when that batch is even; iterating this stream with DataLoader
    workers, indices ``i`` and ``i + 1`` fall to different workers and so into different
    (neighbouring) batches, which is acceptable: the pair is still near in training.

    ``above_left`` (a share) says that share of the position captions with "above" or "to the left of" (the first
    noun on top or on the left) and the rest with their converses, where the spec draws the four relations alike;
    ``above_left_until`` (a sample index) ends it, and ``above_left_after`` is the share from there on (None: the
    spec's uniform draw). Why: with the four relations alike, which noun goes on top is the product of two things a
    generator must learn together, the nouns' roles and the relation's direction; neither alone says anything about the
    image, so gradient descent finds neither (docs/recipe.md, "Roles are an XOR"). Said mostly one way, the roles alone
    predict the layout and are learned first.
    """

    def __init__(
        self,
        size: int = 64,
        seed: int = 0,
        category_weights: dict[str, float] | None = None,
        exclude_held_out: bool = True,
        prefix_suffix_prob: float = 0.1,
        both_ways: bool = False,
        role_pairs: bool = False,
        above_left: float | None = None,
        above_left_until: int | None = None,
        above_left_after: float | None = None,
    ) -> None:
        super().__init__()
        _check_size(size)
        if above_left is not None and not 0 <= above_left <= 1:
            raise ValueError(f"above_left is a share of the position captions and must lie in [0, 1], got {above_left}")
        if above_left_after is not None and (above_left_until is None or not 0 <= above_left_after <= 1):
            raise ValueError(
                f"above_left_after is the share after above_left_until (which it needs) and must lie in [0, 1], got "
                f"above_left_after={above_left_after}, above_left_until={above_left_until}"
            )
        if above_left_until is not None and (above_left is None or above_left_until < 0):
            raise ValueError(
                f"above_left_until (a sample count, >= 0) ends the above_left share and needs one: got "
                f"above_left_until={above_left_until}, above_left={above_left}"
            )
        _normalised_weights(category_weights)  # fail early on bad weights
        if both_ways and role_pairs:
            raise ValueError(
                "both_ways and role_pairs both pair sample 2k+1 with sample 2k's position scene and cannot both be "
                "on: choose the same scene said the other way round (both_ways) or the swapped roles (role_pairs)"
            )
        self.size = size
        self.seed = seed
        self.category_weights = category_weights
        self.exclude_held_out = exclude_held_out
        self.prefix_suffix_prob = prefix_suffix_prob
        self.both_ways = both_ways
        self.role_pairs = role_pairs
        self.above_left = above_left
        self.above_left_until = above_left_until
        self.above_left_after = above_left_after
        self.start_index = 0

    def describe(self) -> dict[str, Any]:
        """What a run reads: an endless stream, every sample captioned by its scene, and the categories' shares of
        the draws (before pairing), which say at a glance whether a spec meant as one category is the uniform mix."""
        shares = ", ".join(
            f"{c} {100 * p:.0f} %" for c, p in zip(CATEGORIES, _normalised_weights(self.category_weights)) if p > 0
        )
        relations = (
            "" if self.above_left is None else f"; position captions above / left of: {100 * self.above_left:.0f} %"
        )
        if self.above_left_until is not None:
            after = "as drawn alike" if self.above_left_after is None else f"{100 * self.above_left_after:.0f} %"
            relations += f" for the first {self.above_left_until} samples, then {after}"
        return {
            "samples": None,
            "captioned": None,
            "captions": "the procedural scenes' own captions (endless)",
            "mix": f"categories drawn: {shares}{relations}",
        }

    def _drawn(self, index: int) -> Scene:
        """Sample ``index``'s scene as drawn without pairing, from its own generator."""
        return sample_scene(
            np.random.default_rng([self.seed, index]),
            self.size,
            exclude_held_out=self.exclude_held_out,
            category_weights=self.category_weights,
            prefix_suffix_prob=self.prefix_suffix_prob,
            above_left=self.above_left
            if self.above_left_until is None or index < self.above_left_until
            else self.above_left_after,
        )

    def scene(self, index: int) -> Scene:
        """Sample ``index``'s scene: its own draw, or with pairing on and ``index`` odd, the partner of the position
        scene at ``index - 1`` (the fallback placement of ``role_pairs`` draws from ``index``'s generator)."""
        if index % 2 and (self.both_ways or self.role_pairs):
            anchor = self._drawn(index - 1)
            if anchor.category == "position":
                if self.both_ways:
                    return said_other_way(anchor)
                return swapped_roles(anchor, np.random.default_rng([self.seed, index]))
        return self._drawn(index)

    def sample(self, index: int) -> dict[str, Any]:
        scene = self.scene(index)
        return {"image": to_tensor(render(scene)), "caption": scene.caption, "scene": scene.to_dict()}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        index = self.start_index + (worker - self.start_index) % workers
        while True:
            yield self.sample(index)
            index += workers


def _all_contents(category: str) -> list[dict[str, Any]]:
    pairs = [(a, b) for a, b in itertools.permutations(SHAPES, 2)]
    if category == "single":
        objs = [[_obj(s)] for s in SHAPES]
    elif category == "colors":
        objs = [[_obj(s, c)] for c in COLORS for s in SHAPES]
    elif category == "two":
        objs = [[_obj(a), _obj(b)] for a, b in pairs]
    elif category == "counting":
        objs = [[_obj(s)] * n for n in COUNT_WORDS for s in SHAPES]
    elif category == "position":
        return [
            {"category": category, "objects": [_obj(a), _obj(b)], "relation": r} for a, b in pairs for r in RELATIONS
        ]
    elif category == "color_attr":
        objs = [[_obj(a, c1), _obj(b, c2)] for a, b in pairs for c1 in COLORS for c2 in COLORS if c1 != c2]
    else:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    return [{"category": category, "objects": o, "relation": None} for o in objs]


def vocabulary() -> tuple[str, ...]:
    """Every word a caption of the stream can hold, sorted: the six forms over every shape, colour, count and
    relation, and the optional prefix and suffix. What a generator trained on ``shapes`` has read, and all it has."""
    captions = [format_caption(c) for category in CATEGORIES for c in _all_contents(category)]
    return tuple(sorted({w for text in [*captions, PREFIX, SUFFIX] for w in text.split()}))


def prompt_set(category: str, n: int, seed: int = 0, held_out: bool = False) -> list[str]:
    """``n`` deterministic evaluation prompts of one category, cycling evenly over all
    distinct prompts. ``held_out=True`` gives only prompts naming a held-out pair
    (categories ``colors`` and ``color_attr``); otherwise none name one."""
    if held_out and category not in ("colors", "color_attr"):
        raise ValueError(f"held-out prompts exist only for colors and color_attr, not {category!r}")
    captions = [format_caption(c) for c in _all_contents(category) if names_held_out(c) == held_out]
    rng = np.random.default_rng([seed, CATEGORIES.index(category), int(held_out)])
    out: list[str] = []
    while len(out) < n:
        out.extend(captions[i] for i in rng.permutation(len(captions)))
    return out[:n]


def _position_parts(caption: str) -> tuple[str, str, str, str, str]:
    """(prefix, A, relation, B, suffix) of a position caption 'A relation B', prefix and suffix '' where absent."""
    head = PREFIX if caption.startswith(PREFIX) else ""
    tail = SUFFIX if caption.endswith(SUFFIX) and len(caption) > len(head) + len(SUFFIX) else ""
    core = caption[len(head) : len(caption) - len(tail)]
    relation = next((r for r in RELATIONS if f" {r} " in core), None)
    if relation is None:
        raise ValueError(f"not a position caption (no relation among {list(RELATIONS)}): {caption!r}")
    first, second = core.split(f" {relation} ")
    return head, first, relation, second, tail


def swap_roles(caption: str) -> str:
    """A position caption with its two objects swapped, prefix and suffix kept: 'a red circle above a square' ->
    'a square above a red circle'. The same relation word with the roles reversed: what the diagnosis scripts ask a
    generator to tell apart."""
    head, first, relation, second, tail = _position_parts(caption)
    return f"{head}{second} {relation} {first}{tail}"


def role_negative(caption: str) -> str | None:
    """A training caption's hard negative for word order: a position caption with its roles swapped
    (:func:`swap_roles`), which asks for the reversed layout with the same words; None for a caption that holds no
    single relation word (the other categories), which has none."""
    try:
        return swap_roles(caption)
    except ValueError:  # no relation word, or more than one
        return None


def other_way(caption: str) -> str:
    """The same scene said the other way round: the objects swapped and the relation replaced by its converse,
    prefix and suffix kept: 'a red circle above a square' -> 'a square below a red circle'. Unlike
    :func:`swap_roles`, it asks for the same picture (relation_holds(r, a, b) == relation_holds(CONVERSE[r], b, a))."""
    head, first, relation, second, tail = _position_parts(caption)
    return f"{head}{second} {CONVERSE[relation]} {first}{tail}"
