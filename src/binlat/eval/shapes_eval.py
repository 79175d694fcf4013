"""`binlat eval shapes`: the compositional benchmark of shapes-spec.md, as a report and a failure sheet.

The scoring itself (prompt sets per category, the judge, accuracy per category and overall, the held-out sets
apart) is binlat.judge.accuracy's, which training's running score and the probes share. Images come from a pipeline
(generator ``kind`` diffusion or ar), or in ground-truth mode from ``render(scene_for_caption(prompt, rng))`` with
``rng = numpy.random.default_rng(seed + i)``, either passed through the tokenizer (encode -> decode: the tokenizer's
ceiling on this benchmark) or as rendered (``tokenizer=None``), which must score ~1.0 and so checks the harness and
the judge themselves.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from binlat.data.shapes import render, scene_for_caption, to_tensor
from binlat.generation import settings_record
from binlat.judge.accuracy import ImagesFn, evaluate_shapes, pipeline_images
from binlat.sampling import settings as registered_settings

MAX_SHEET_FAILURES = 96
SHEET_NAME = "shapes-failures.png"


def ground_truth_images(size: int = 64, tokenizer=None, batch_size: int = 16) -> ImagesFn:
    """Renders of a scene satisfying each prompt (rng seed + i), optionally through the tokenizer's round trip."""

    def make(prompts: list[str], seed: int) -> list[Image.Image]:
        renders = [
            render(scene_for_caption(p, np.random.default_rng(seed + i), size=size)) for i, p in enumerate(prompts)
        ]
        if tokenizer is None:
            return renders
        from binlat.generation import to_pil

        device = next(tokenizer.parameters()).device
        out: list[Image.Image] = []
        for start in range(0, len(renders), batch_size):
            x = torch.stack([to_tensor(im) for im in renders[start : start + batch_size]]).to(device)
            with torch.inference_mode():
                out += to_pil(tokenizer.decode(tokenizer.encode(x), size, size).cpu())
        return out

    return make


def shapes_tables(summary: dict[str, Any], mode: str) -> list[dict[str, Any]]:
    from .report import make_table

    cats = summary["categories"]
    rows = [[c, v["accuracy"], v["correct"], v["count"]] for c, v in cats.items()]
    rows.append([f"overall (mean of {len(cats)})", summary["overall"], summary["correct"], summary["count"]])
    tables = [
        make_table(f"shapes compositional accuracy ({mode})", ["category", "accuracy", "correct", "images"], rows)
    ]
    held = summary["held_out"]
    if held["categories"]:
        rows = [[c, v["accuracy"], v["correct"], v["count"]] for c, v in held["categories"].items()]
        rows.append(
            [f"held-out overall (mean of {len(held['categories'])})", held["overall"], held["correct"], held["count"]]
        )
        tables.append(
            make_table(
                "held-out compositions (yellow triangle, purple circle; not in the overall score)",
                ["category", "accuracy", "correct", "images"],
                rows,
            )
        )
    relations = summary.get("relations")
    if relations and sum(relations.values()):
        rows = [[k, v] for k, v in relations.items()]
        tables.append(
            make_table(
                "position images with the right two objects: relation holds / reversed (roles swapped) / wrong axis",
                ["outcome", "images"],
                rows,
            )
        )
    return tables


def failure_label(item: dict[str, Any]) -> str | None:
    """The judge's reason for a failed item in a few words, for its place under the image on a failure sheet:
    "wrong count" (counting prompts), "extra object" / "missing object" (other prompts), "wrong colour",
    "colours swapped" (the right shapes and colours, bound wrongly), "wrong shape", "wrong shape and colour",
    "relation reversed" (A above B drawn as B above A) or "wrong relation"
    (right objects, neither the relation nor its opposite), with the object counts where they are wrong ("extra
    object (2 for 1)"); None for a correct item. The judge's `failure` says
    which check failed; the caption and the objects it found say how."""
    from binlat.data.shapes import parse_caption

    failure, found = item.get("failure"), item.get("objects") or []
    if failure is None:
        return None
    if failure == "reversed":
        return "relation reversed"
    if failure == "axis":
        return "wrong relation"
    want = parse_caption(item["prompt"])["objects"]
    if failure == "count":
        counts = f"({len(found)} for {len(want)})"
        if item.get("category") == "counting":
            return f"wrong count {counts}"
        return f"{'extra' if len(found) > len(want) else 'missing'} object {counts}"
    # Same number of objects, but no assignment matches: the shapes alone, or the named colours alone, may.
    shapes_match = sorted(o["shape"] for o in found) == sorted(w["shape"] for w in want)
    named = [w["color"] for w in want if w["color"]]
    colours_match = all(named.count(c) <= [o["color"] for o in found].count(c) for c in set(named))
    if shapes_match:  # every named colour drawn, on the wrong objects: the binding failed
        return "colours swapped" if colours_match else "wrong colour"
    return "wrong shape" if colours_match else "wrong shape and colour"


def failure_sheet(
    failures: Sequence[tuple[Image.Image, str, int, dict[str, Any]]], limit: int = MAX_SHEET_FAILURES
) -> tuple[Image.Image, int] | None:
    """A contact sheet of up to `limit` failures, taken round-robin over (set, category) so each is seen, each
    labelled with its prompt and the judge's reason (failure_label)."""
    if not failures:
        return None
    from binlat.grid import contact_sheet

    groups: dict[tuple[str, str], list] = {}
    for f in failures:
        groups.setdefault((f[3]["set"], f[3]["category"]), []).append(f)
    chosen: list = []
    queues = [list(g) for g in groups.values()]
    while len(chosen) < limit and any(queues):
        for q in queues:
            if q and len(chosen) < limit:
                chosen.append(q.pop(0))
    # Each label: the prompt, then on a line of its own the judge's reason.
    labels = [
        ("[held-out] " if f[3]["set"] == "held_out" else "")
        + f[1]
        + (f"\nwhy: {reason}" if (reason := failure_label(f[3])) else "")
        for f in chosen
    ]
    sheet = contact_sheet([f[0] for f in chosen], labels, [f[2] for f in chosen], cell=160)
    return sheet, len(chosen)


def run_shapes(
    model: str | Path | None,
    kind: str = "diffusion",
    per_category: int = 64,
    sampling: Mapping[str, Any] | None = None,
    seed: int = 0,
    batch_size: int = 8,
    out: str | Path = "out/eval",
    json_path: str | Path | None = None,
    ground_truth: bool = False,
    no_tokenizer: bool = False,
    size: int | None = None,
    held_out: bool = True,
    text_encoder: str | None = None,
    device: str = "cpu",
    progress: bool = False,
    pipeline=None,
) -> dict[str, Any]:
    """The whole `binlat eval shapes`: make or render the images, judge them, write the failure sheet and the
    report; return the report (its "tables" are what the CLI prints). `sampling`: settings as Pipeline.__call__
    takes them (those left out take the model's). `pipeline` may be given ready-made."""
    from binlat.io import atomic_write_bytes

    from .report import make_report, report_path, write_report

    if no_tokenizer and not ground_truth:
        raise ValueError("--no-tokenizer only applies with --ground-truth")
    used = {name: None for name in registered_settings()}  # recorded only where the generator reads them
    if ground_truth:
        tokenizer = None
        if not no_tokenizer:
            if model is None:
                raise ValueError(
                    "--ground-truth needs --model DIR (a bundle or tokenizer directory) for the "
                    "tokenizer round trip, or --no-tokenizer to judge the renders themselves"
                )
            from .reconstruction import load_tokenizer

            tokenizer = load_tokenizer(model, device)
            size = size or tokenizer.config.image_size
            tokenizer.check_size(size, size)
        size = size or 64
        mode = "ground truth, rendered" if tokenizer is None else "ground truth through the tokenizer"
        images_fn = ground_truth_images(size, tokenizer, batch_size)
    else:
        if pipeline is None:
            if model is None:
                raise ValueError("give --model DIR (a pipeline bundle), or --ground-truth")
            if not Path(model).is_dir():
                raise FileNotFoundError(
                    f"model directory {model} does not exist (pass --model DIR with a binlat bundle)"
                )
            from binlat.pipeline import Pipeline

            pipeline = Pipeline.from_pretrained(model, text_encoder=text_encoder, device=device)
        size = size or pipeline.config.image_size
        mode = f"{kind} generator"
        settings = pipeline.sampling_settings(kind, **(sampling or {}))
        used |= settings_record(kind, settings)
        images_fn = pipeline_images(pipeline, kind, batch_size=batch_size, size=size, progress=progress, **settings)
    if size < 64:
        print(
            f"note: judging is meant for images of 64 px and more (shapes-spec); these are {size} px", file=sys.stderr
        )
    result = evaluate_shapes(images_fn, per_category, seed, held_out=held_out, progress=progress)
    summary = result["summary"] | {"mode": mode, "image_size": size}
    out = Path(out)
    sheet = failure_sheet(result["failures"])
    summary["failures"] = len(result["failures"])
    summary["failures_sheet"] = None
    summary["failures_shown"] = 0
    if sheet is not None:
        buf = io.BytesIO()
        sheet[0].save(buf, format="PNG")
        path = out / SHEET_NAME
        atomic_write_bytes(path, buf.getvalue())
        summary["failures_sheet"], summary["failures_shown"] = str(path), sheet[1]
    generating = not ground_truth
    arguments = {
        "model": None if model is None else str(model),
        "generator": kind if generating else None,  # the report keeps the CLI's name
        "per_category": per_category,
        **used,
        "seed": seed,
        "batch_size": batch_size,
        "ground_truth": ground_truth,
        "no_tokenizer": no_tokenizer,
        "size": size,
        "held_out": held_out,
        "text_encoder": text_encoder,
        "device": str(device),
    }
    report = make_report(
        "shapes",
        None if model is None else str(model),
        arguments,
        summary,
        result["items"],
        shapes_tables(summary, mode),
    )
    path = write_report(report, report_path(json_path, out, "shapes"))
    report["path"] = str(path)
    return report
