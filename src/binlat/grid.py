"""A labelled contact sheet of generated images."""
from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont


def contact_sheet(images: Sequence[Image.Image], prompts: Sequence[str], seeds: Sequence[int] | None = None,
                  columns: int | None = None, cell: int = 192) -> Image.Image:
    """Images scaled to `cell` px on a grid, each with its prompt (and seed) printed below."""
    if not images:
        raise ValueError("no images for a contact sheet")
    columns = columns or min(len(images), max(1, math.ceil(math.sqrt(len(images)))))
    rows = math.ceil(len(images) / columns)
    font = ImageFont.load_default()
    label_h = 30
    sheet = Image.new("RGB", (columns * cell, rows * (cell + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    chars = max(8, cell // 6)
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        x, y = (i % columns) * cell, (i // columns) * (cell + label_h)
        sheet.paste(image.convert("RGB").resize((cell, cell), Image.NEAREST), (x, y))
        text = prompt if len(prompt) <= chars else prompt[: chars - 1] + "…"
        draw.text((x + 3, y + cell + 2), text, fill="black", font=font)
        if seeds is not None:
            draw.text((x + 3, y + cell + 15), f"seed {seeds[i]}", fill="gray", font=font)
    return sheet
