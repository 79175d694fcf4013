"""How samples become a batch: the one DataLoader ``collate_fn`` of every binlat dataset and of the trainer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..validators import is_int


def _is_marker(sample: dict[str, Any]) -> bool:
    """A sample that could not be read, reduced to the messages saying why: ``{"skipped": [...]}``."""
    return set(sample) == {"skipped"}


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Join samples into a batch: tensors stack, ints (the trainer's ``index``) become one long tensor, every other
    field (``caption``, ``key``, ``scene``) is listed. A field is kept only when every sample has it; ``caption``
    defaults to "" (unconditional).

    Skip messages (``"skipped"``, attached by the trainer to the next good sample, or alone as a marker in place of
    a sample that could not be read) are gathered under ``"skipped"`` and markers are dropped; a batch of nothing
    but markers comes out empty, with an empty ``index``, so the trainer still sees its messages."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    skipped = [message for s in samples for message in s.get("skipped", ())]
    kept = [s for s in samples if not _is_marker(s)]
    out: dict[str, Any] = {}
    for name in kept[0] if kept else ():
        if name == "skipped" or not all(name in s for s in kept):
            continue
        values = [s[name] for s in kept]
        if isinstance(values[0], torch.Tensor):
            out[name] = torch.stack(values)
        elif is_int(values[0]):
            out[name] = torch.tensor(values, dtype=torch.long)
        else:
            out[name] = values
    out.setdefault("caption", [""] * len(kept))
    if not kept:
        out["index"] = torch.zeros(0, dtype=torch.long)
    if any("skipped" in s for s in samples):
        out["skipped"] = skipped
    return out


__all__ = ["collate"]
