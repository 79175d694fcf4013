"""The words a generator's training captions hold, by data SPEC: what a bundle records so that generation can say
when a prompt asks for words the model never read (binlat.card, Pipeline.warn_vocabulary).

A vocabulary is `{"source": what it was read from, "words": sorted words}`, or None where it is not known: tar
shards (reading every shard at export would take as long as an epoch), data that is gone, or more captions than
MAX_CAPTIONS. Unknown is never guessed: a bundle without a vocabulary warns about nothing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

MAX_CAPTIONS = 200_000  # past this many captions a folder's vocabulary is left unknown rather than read for minutes
SHAPES = "shapes"
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")  # letters and digits of any script; "don't" stays one word


def words(text: str) -> list[str]:
    """The words of `text`, lower-cased, in order (punctuation and spacing dropped)."""
    return _WORD.findall(text.lower())


def unknown_words(prompts: Iterable[str], vocabulary: dict[str, Any]) -> list[str]:
    """The distinct words of `prompts`, in the order they first appear, that `vocabulary` does not hold."""
    known = set(vocabulary["words"])
    return [w for w in dict.fromkeys(w for p in prompts for w in words(p)) if w not in known]


def unknown_words_message(new: list[str], vocabulary: dict[str, Any]) -> str:
    """The warning that names the words `new`, outside `vocabulary`, beside the first 40 words it does hold."""
    listed = ", ".join(vocabulary["words"][:40]) + (", …" if len(vocabulary["words"]) > 40 else "")
    named = ", ".join(f'"{w}"' for w in new)
    return (
        f"{named} {'is' if len(new) == 1 else 'are'} not in this model's training vocabulary "
        f"({vocabulary['source']}: {listed}); expect a blank or unrelated image"
    )


def vocabulary(source: str, captions: Iterable[str]) -> dict[str, Any]:
    return {"source": source, "words": sorted({w for caption in captions for w in words(caption)})}


def shapes_vocabulary() -> dict[str, Any]:
    from .shapes import vocabulary as shapes_words

    return {"source": SHAPES, "words": list(shapes_words())}


def _is_shapes(spec: str) -> bool:
    return spec == SHAPES or spec.startswith(SHAPES + ":")


def _precomputed_captions(root: Path) -> list[str] | None:
    """The captions stored in a precomputed folder's shards (their metadata only; no tensor is read)."""
    from safetensors import safe_open

    captions: list[str] = []
    for shard in sorted(root.glob("shard-*.safetensors")):
        try:
            with safe_open(str(shard), framework="pt") as f:
                captions += json.loads((f.metadata() or {}).get("captions", "[]"))
        except Exception:  # noqa: BLE001 — a damaged shard (safetensors' own error type): the words are unknown
            return None
        if len(captions) > MAX_CAPTIONS:
            return None
    return captions


def vocabulary_of(spec: str) -> dict[str, Any] | None:
    """The vocabulary of the captions data SPEC `spec` holds (see the module docstring), or None if unknown."""
    from .precomputed import INDEX

    spec = str(spec or "").strip()
    if _is_shapes(spec):
        return shapes_vocabulary()
    folder = Path(spec.removeprefix("precomputed:")).expanduser()
    try:
        if (folder / INDEX).is_file():  # bits made once from other data: that data's words, else the stored ones
            made_from = str(json.loads((folder / INDEX).read_text(encoding="utf-8")).get("data") or "")
            if _is_shapes(made_from):
                return shapes_vocabulary()
            captions = _precomputed_captions(folder)
            return None if captions is None else vocabulary(f"the captions of {spec}", captions)
        if folder.is_dir() or spec.lower().endswith((".jsonl", ".csv")):
            from .readers import make_dataset

            data: Any = make_dataset(spec, size=64, random_crop=False)  # a manifest (entries) or a folder (files)
            if len(data) > MAX_CAPTIONS:
                return None
            if hasattr(data, "entries"):  # a manifest holds its captions already
                captions = [caption for _, _, caption in data.entries]
            else:
                from .readers import _read_caption

                captions = [_read_caption(p.with_suffix(".txt")) for p in data.files]
            return vocabulary(f"the captions of {spec}", captions)
    except (OSError, ValueError, UnicodeDecodeError):  # data moved, damaged or unreadable: unknown, not a failure
        return None
    return None
