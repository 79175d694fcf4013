"""A labelled contact sheet of generated images."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont


def contact_sheet(
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    seeds: Sequence[int] | None = None,
    columns: int | None = None,
    cell: int = 192,
) -> Image.Image:
    """Images scaled to `cell` px on a grid, each with its prompt (and seed) printed below, wrapped at word
    boundaries (a label never ends mid-word; past MAX_LABEL_LINES lines the last one ends in "…")."""
    if not images:
        raise ValueError("no images for a contact sheet")
    columns = columns or min(len(images), max(1, math.ceil(math.sqrt(len(images)))))
    rows = math.ceil(len(images) / columns)
    font = ImageFont.load_default()
    chars = max(8, cell // 6)
    labels = [label_lines(p, chars) for p in prompts[: len(images)]]
    lines = max(len(x) for x in labels) + (seeds is not None)
    label_h = LINE_HEIGHT * lines + 4
    sheet = Image.new("RGB", (columns * cell, rows * (cell + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, label) in enumerate(zip(images, labels)):
        x, y = (i % columns) * cell, (i // columns) * (cell + label_h)
        sheet.paste(image.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST), (x, y))
        for j, line in enumerate(label):
            draw.text((x + 3, y + cell + 2 + LINE_HEIGHT * j), line, fill="black", font=font)
        if seeds is not None:
            draw.text((x + 3, y + cell + 2 + LINE_HEIGHT * len(label)), f"seed {seeds[i]}", fill="gray", font=font)
    return sheet


LINE_HEIGHT = 13
MAX_LABEL_LINES = 4


def label_lines(text: str, chars: int) -> list[str]:
    """`text` wrapped to lines of at most `chars` characters at word boundaries (a word longer than a line is cut),
    at most MAX_LABEL_LINES of them; a newline in `text` starts a new line."""
    lines = [line for part in text.split("\n") for line in textwrap.wrap(part, chars, break_on_hyphens=False) or [""]]
    if len(lines) > MAX_LABEL_LINES:
        lines = lines[:MAX_LABEL_LINES]
        lines[-1] = lines[-1][: chars - 1].rstrip() + "…"
    return lines
