"""Judged accuracy on the `shapes` benchmark: the scoring that training, evaluation and the probes share.

For each of the six categories, ``prompt_set(category, n, seed)`` gives n prompts; image i of a prompt list is made
with seed ``seed + i`` by an images function and judged by ``binlat.judge.shapes.judge`` exactly as shapes-spec.md
says. Accuracy per category is the share of correct images, the overall score the mean of the six. Prompts naming a
held-out composition (a yellow triangle or a purple circle; categories colors and color_attr,
``prompt_set(..., held_out=True)``) are scored the same way and reported apart, never in the headline.

The images function comes from the caller: ``pipeline_images`` wraps anything called like a Pipeline (this module
never builds one), binlat.eval adds the ground-truth renders. Reports and failure sheets are binlat.eval's.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from binlat.data.shapes import CATEGORIES, prompt_set

from .shapes import judge

HELD_OUT_CATEGORIES = ("colors", "color_attr")

# prompts, base seed -> one image per prompt, image i made with seed + i
ImagesFn = Callable[[list[str], int], list[Image.Image]]


def pipeline_images(
    pipe,
    kind: str = "diffusion",
    *,
    batch_size: int = 8,
    size: int | None = None,
    progress: bool = False,
    **settings: Any,
) -> ImagesFn:
    """Images from a Pipeline (image i of a call uses seed + i); `settings` are sampling settings as the pipeline
    takes them, those left out or None taking the bundle's."""

    def make(prompts: list[str], seed: int) -> list[Image.Image]:
        result = pipe(
            prompts,
            kind=kind,
            seed=seed,
            height=size,
            width=size,
            batch_size=batch_size,
            progress=progress,
            **settings,
        )
        return list(result.images)

    return make


def _compact(objects: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"shape": o["shape"], "color": o["color"], "cx": float(o["cx"]), "cy": float(o["cy"]), "area": int(o["area"])}
        for o in objects
    ]


def evaluate_shapes(
    images_fn: ImagesFn,
    per_category: int = 64,
    seed: int = 0,
    held_out: bool = True,
    categories: Sequence[str] = CATEGORIES,
    progress: bool = False,
) -> dict[str, Any]:
    """Judge `per_category` images per category (and per held-out category).

    Returns ``{"summary", "items", "failures"}``: failures are ``(image, prompt, seed, item)`` tuples."""
    if per_category < 1:
        raise ValueError(f"per_category must be >= 1, got {per_category}")
    sets = [("main", c) for c in categories]
    if held_out:
        sets += [("held_out", c) for c in HELD_OUT_CATEGORIES if c in categories]
    items: list[dict[str, Any]] = []
    failures: list[tuple[Image.Image, str, int, dict[str, Any]]] = []
    for kind, category in sets:
        prompts = prompt_set(category, per_category, seed=seed, held_out=kind == "held_out")
        images = images_fn(prompts, seed)
        if len(images) != len(prompts):
            raise RuntimeError(f"{category}: asked for {len(prompts)} images, got {len(images)}")
        correct = 0
        for i, (image, prompt) in enumerate(zip(images, prompts)):
            verdict = judge(image, prompt)
            if verdict["category"] != category:  # prompt_set and parse_caption disagree: a bug, not a miss
                raise RuntimeError(f"prompt {prompt!r} of {category} parses as {verdict['category']}")
            item = {
                "set": kind,
                "category": category,
                "index": i,
                "prompt": prompt,
                "seed": seed + i,
                "correct": bool(verdict["correct"]),
                "reason": verdict["reason"],
                "failure": verdict["failure"],
                "objects": _compact(verdict["objects"]),
            }
            items.append(item)
            correct += item["correct"]
            if not item["correct"]:
                failures.append((image, prompt, seed + i, item))
        if progress:
            print(f"shapes {kind} {category}: {correct}/{len(prompts)} correct", file=sys.stderr, flush=True)
    return {"summary": summarise(items, categories), "items": items, "failures": failures}


def summarise(items: Sequence[dict[str, Any]], categories: Sequence[str] = CATEGORIES) -> dict[str, Any]:
    """Accuracy per category and overall (mean of the categories), and the held-out sets apart."""

    def block(kind: str, cats: Sequence[str]) -> dict[str, Any]:
        per = {}
        for c in cats:
            rows = [it for it in items if it["set"] == kind and it["category"] == c]
            if rows:
                k = sum(it["correct"] for it in rows)
                per[c] = {"accuracy": k / len(rows), "correct": k, "count": len(rows)}
        overall = float(np.mean([v["accuracy"] for v in per.values()])) if per else None
        return {
            "categories": per,
            "overall": overall,
            "correct": sum(v["correct"] for v in per.values()),
            "count": sum(v["count"] for v in per.values()),
        }

    main = block("main", categories)
    held = block("held_out", [c for c in HELD_OUT_CATEGORIES if c in categories])
    return {
        "accuracy": {c: v["accuracy"] for c, v in main["categories"].items()},
        "overall": main["overall"],
        "categories": main["categories"],
        "correct": main["correct"],
        "count": main["count"],
        "held_out": held,
        "relations": relation_outcomes(items),
    }


def relation_outcomes(items: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Of the main set's position images whose two objects came out right: how many hold the relation, how many
    draw its exact opposite (a role reversal: the binding failure) and how many miss the axis."""
    rows = [
        it
        for it in items
        if it["set"] == "main"
        and it["category"] == "position"
        and (it["correct"] or it.get("failure") in ("reversed", "axis"))
    ]
    return {
        "holds": sum(it["correct"] for it in rows),
        "reversed": sum(it.get("failure") == "reversed" for it in rows),
        "axis": sum(it.get("failure") == "axis" for it in rows),
    }
