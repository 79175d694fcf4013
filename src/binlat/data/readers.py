"""Local real-image readers (an image folder, a JSONL/CSV manifest) and the CLI's data SPEC.

The sample format, the split across ranks and workers, and how skipped samples are
counted and reported are shared by every reader: see :mod:`binlat.data.base`.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import IterableDataset

from binlat import jsondepth
from binlat.data.base import (
    CAPTION_KEYS,
    IMAGE_EXTENSIONS,
    IndexedImageDataset,
    Transform,
    first_of,
    logger,
)
from binlat.data.shards import WebDatasetShards, expand_shards
from binlat.data.transforms import ImageLoadError, ImageTransform, load_image
from binlat.io import FileRefused, read_bounded

PATH_KEYS: tuple[str, ...] = ("path", "image")


def _read_caption(path: Path) -> str:
    """Stripped UTF-8 text of ``path``, or "" if it does not exist.

    Raises ``UnicodeDecodeError`` / ``OSError`` for unreadable captions.
    """
    try:
        data = read_bounded(path, what="caption")
    except FileNotFoundError:
        return ""
    return data.decode("utf-8-sig").strip()


# ---------------------------------------------------------------- image folder


class ImageFolderDataset(IndexedImageDataset):
    """Every image under ``root`` (recursive; .jpg .jpeg .png .webp .bmp, any case;
    hidden files and folders skipped), in sorted path order, each captioned by a
    same-named ``.txt`` beside it (stripped UTF-8; missing -> "" i.e. unconditional).

    Keys are the image paths relative to ``root`` (POSIX separators, with extension).
    A caption that is not valid UTF-8 skips its sample. ``options``: those of
    :class:`~binlat.data.base.ImageTextDataset` (shuffle, seed, max_pixels, min_side).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Transform,
        *,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        **options: Any,
    ) -> None:
        super().__init__(transform, **options)
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"image folder {self.root} does not exist or is not a directory")
        exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
        self.files: list[Path] = self._scan(self.root, exts)
        if not self.files:
            raise ValueError(f"no images ({', '.join(sorted(exts))}) found under {self.root}")

    @staticmethod
    def _scan(root: Path, exts: set[str]) -> list[Path]:
        found: list[str] = []
        seen_dirs: set[str] = set()
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            real = os.path.realpath(dirpath)
            if real in seen_dirs:  # symlink loop
                dirnames[:] = []
                continue
            seen_dirs.add(real)
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if not name.startswith(".") and os.path.splitext(name)[1].lower() in exts:
                    found.append(os.path.relpath(os.path.join(dirpath, name), root))
        return [root / rel for rel in sorted(found, key=lambda p: Path(p).as_posix())]

    def __repr__(self) -> str:
        return f"ImageFolderDataset({str(self.root)!r}, {len(self.files)} images, transform={self.transform!r})"

    def __len__(self) -> int:
        return len(self.files)

    def key_of(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def describe(self) -> dict[str, Any]:
        """What a run reads: sample count, how many have a caption file, and where captions come from."""
        captioned = sum(p.with_suffix(".txt").is_file() for p in self.files)
        return {"samples": len(self.files), "captioned": captioned, "captions": "same-named .txt files"}

    def sample(self, index: int) -> dict[str, Any] | None:
        """Sample ``index`` of the sorted file list, or None if it is skipped."""
        path = self.files[index]
        key = self.key_of(path)
        try:
            caption = _read_caption(path.with_suffix(".txt"))
        except UnicodeDecodeError as exc:
            self._skip(key, f"caption {path.with_suffix('.txt')} is not valid UTF-8 ({exc.reason} at byte {exc.start})")
            return None
        except OSError as exc:
            self._skip(key, f"cannot read caption {path.with_suffix('.txt')}: {exc}")
            return None
        return self._make_sample(key, path, caption, str(path))


# ---------------------------------------------------------------- manifest


class ManifestDataset(IndexedImageDataset):
    """Images listed in a JSONL or CSV manifest.

    JSONL: one object per non-blank line with ``path`` (or ``image``) and ``caption``
    (or ``text``; missing/null -> ""). CSV: a header row with a ``path``/``image`` and
    optionally a ``caption``/``text`` column. An optional ``key``/``id`` field names
    the sample (default: the path as written). Relative paths resolve against the
    manifest's folder. A malformed entry raises ``ValueError`` naming its line at
    construction; a missing or corrupt image is skipped (and counted) at iteration.
    ``options``: those of :class:`~binlat.data.base.ImageTextDataset`.
    """

    def __init__(self, path: str | os.PathLike, transform: Transform, **options: Any) -> None:
        super().__init__(transform, **options)
        self.path = Path(path)
        if not self.path.exists():  # a device, FIFO or directory is refused by read_bounded, naming what it is
            raise ValueError(f"manifest {self.path} does not exist")
        suffix = self.path.suffix.lower()
        try:
            text = read_bounded(self.path, what="manifest").decode("utf-8-sig")
        except FileRefused as exc:
            raise ValueError(str(exc)) from None
        except UnicodeDecodeError as exc:
            raise ValueError(f"manifest {self.path} is not valid UTF-8: {exc}") from exc
        if suffix == ".jsonl":
            raw = self._parse_jsonl(text)
        elif suffix == ".csv":
            raw = self._parse_csv(text)
        else:
            raise ValueError(f"manifest {self.path}: expected a .jsonl or .csv file")
        if not raw:
            raise ValueError(f"manifest {self.path} lists no images")
        base = self.path.parent
        # (key, resolved image path, caption)
        self.entries: list[tuple[str, Path, str]] = []
        for key, rel, caption in raw:
            p = Path(os.path.expanduser(rel))
            self.entries.append((key, p if p.is_absolute() else base / p, caption))

    def __repr__(self) -> str:
        return f"ManifestDataset({str(self.path)!r}, {len(self.entries)} entries, transform={self.transform!r})"

    def __len__(self) -> int:
        return len(self.entries)

    def describe(self) -> dict[str, Any]:
        """What a run reads: sample count, how many have a caption, and where captions come from."""
        return {
            "samples": len(self.entries),
            "captioned": sum(bool(c) for _, _, c in self.entries),
            "captions": f"the manifest's caption column ({self.path.name})",
        }

    def _bad(self, line: int, why: str) -> ValueError:
        return ValueError(f"manifest {self.path} line {line}: {why}")

    def _entry(self, line: int, obj: dict[str, Any]) -> tuple[str, str, str]:
        rel = first_of(obj, PATH_KEYS)
        if not isinstance(rel, str) or not rel.strip():
            raise self._bad(line, f"needs a non-empty string 'path' or 'image' field, got {obj!r}")
        caption = first_of(obj, CAPTION_KEYS)
        if caption is None:
            caption = ""
        if not isinstance(caption, str):
            raise self._bad(line, f"caption must be a string, got {caption!r}")
        key = first_of(obj, ("key", "id"))
        return (rel.strip() if key is None else str(key)), rel.strip(), caption.strip()

    def _parse_jsonl(self, text: str) -> list[tuple[str, str, str]]:
        out = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = jsondepth.loads(line)
            except json.JSONDecodeError as exc:
                raise self._bad(lineno, f"invalid JSON ({exc.msg} at column {exc.colno})") from exc
            except jsondepth.JSONNestingError as exc:
                raise self._bad(lineno, str(exc)) from None
            if not isinstance(obj, dict):
                raise self._bad(lineno, f"expected a JSON object, got {type(obj).__name__}")
            out.append(self._entry(lineno, obj))
        return out

    def _parse_csv(self, text: str) -> list[tuple[str, str, str]]:
        reader = csv.reader(io.StringIO(text, newline=""))
        out: list[tuple[str, str, str]] = []
        try:
            header = next(reader, None)
            if header is None:
                return out
            columns = [h.strip().lower() for h in header]
            if not any(k in columns for k in PATH_KEYS):
                raise self._bad(1, f"CSV header needs a 'path' or 'image' column, got {header}")
            for row in reader:
                if not row or all(not c.strip() for c in row):
                    continue
                if len(row) != len(columns):
                    raise self._bad(reader.line_num, f"expected {len(columns)} fields, got {len(row)}: {row}")
                out.append(self._entry(reader.line_num, {c: v for c, v in zip(columns, row) if v != ""}))
        except csv.Error as exc:
            raise self._bad(reader.line_num, f"malformed CSV: {exc}") from exc
        return out

    def sample(self, index: int) -> dict[str, Any] | None:
        """Entry ``index`` of the manifest, or None if it is skipped."""
        key, path, caption = self.entries[index]
        return self._make_sample(key, path, caption, str(path))


# ---------------------------------------------------------------- SPEC


SPEC_FORMS = (
    "'shapes' or 'shapes:seed=N,color_attr=2,both_ways=1,...' (procedural shapes; category weights relative to 1; "
    "both_ways=1 or role_pairs=1 follows each position scene with the same scene said the other way round or with "
    "its roles swapped; above_left=P says that share of position captions with 'above' or 'to the left of', for the "
    "first above_left_until=N samples if given, above_left_after=Q after them), an "
    "existing image folder (images + same-named .txt captions), a .jsonl/.csv manifest, or WebDataset .tar shards "
    "(path, brace pattern 'shard-{000..009}.tar', glob, or, typed on the command line with --allow-data-commands, "
    "a URL such as pipe:/http:)"
)

# The shapes spec's switches: ShapesStream's pairing options, each 0 (the default) or 1, at most one on.
_SHAPES_SWITCHES = {
    "both_ways": "1: each position scene followed by the same picture said the other way round",
    "role_pairs": "1: each position scene followed by its roles swapped, the objects' places exchanged",
}


# The shapes spec's numeric options and how each is read (ShapesStream checks their ranges).
_SHAPES_NUMBERS: dict[str, type] = {
    "seed": int,
    "above_left": float,
    "above_left_until": int,
    "above_left_after": float,
}


def _shapes_options(spec: str, seed: int) -> dict[str, Any] | None:
    """ShapesStream's options (seed, category_weights, both_ways, role_pairs) of a shapes spec, or None if ``spec``
    is not one.

    ``shapes:seed=3,color_attr=2,position=2`` reseeds the stream and weights its categories; a category left out
    keeps weight 1, so the weights are relative to the uniform mix. ``both_ways=1`` makes sample 2k+1 of a position
    scene 2k that scene said the other way round ("B below A" for "A above B"); ``role_pairs=1`` makes it the scene
    with its roles swapped ("B above A", the objects' places exchanged). Both 0 by default; ShapesStream refuses
    both at 1. ``above_left=0.8`` says 80 % of the position captions with "above" or "to the left of" (the first
    noun on top or on the left) and the rest with their converses, where the spec draws the four alike;
    ``above_left_until=N`` keeps that share for samples 0..N-1 only, and ``above_left_after=Q`` is the share after
    them (else the spec's uniform draw)."""
    options: dict[str, Any] = {"seed": seed, "category_weights": None}
    if spec == "shapes":
        return options
    if not spec.startswith("shapes:"):
        return None
    from binlat.data.shapes import CATEGORIES

    weights: dict[str, float] = {}
    for part in spec[len("shapes:") :].split(","):
        name, eq, value = (x.strip() for x in part.partition("="))
        if not eq or (name not in _SHAPES_NUMBERS and name not in _SHAPES_SWITCHES and name not in CATEGORIES):
            raise ValueError(
                f"bad shapes spec {spec!r}: expected 'shapes:seed=N', category weights such as "
                f"'shapes:color_attr=2' (categories: {', '.join(CATEGORIES)}), 'both_ways=1', 'role_pairs=1' or "
                "'above_left=0.8'"
            )
        if name in _SHAPES_SWITCHES:
            if value not in ("0", "1"):
                raise ValueError(
                    f"bad shapes spec {spec!r}: {name} must be 0 or 1 ({_SHAPES_SWITCHES[name]}), got {value!r}"
                )
            options[name] = value == "1"
            continue
        read = _SHAPES_NUMBERS.get(name, float)  # a category's weight is a number
        try:
            number = read(value)
        except ValueError as exc:
            kind = "an integer" if read is int else "a number"
            raise ValueError(f"bad shapes spec {spec!r}: {name} must be {kind}") from exc
        if name in _SHAPES_NUMBERS:
            options[name] = number
        else:
            weights[name] = number
    if weights:  # ShapesStream checks the weights, and that at most one switch is on
        options["category_weights"] = {c: weights.get(c, 1.0) for c in CATEGORIES}
        if len(set(options["category_weights"].values())) == 1:  # "shapes:position=1" read as "position only"
            named = ",".join(f"{c}={'1' if c in weights else '0'}" for c in CATEGORIES)
            logger.warning(
                "shapes spec %r weighs every category alike: that is the uniform mix (a category left out keeps "
                "weight 1). For only the categories named, give the others 0: 'shapes:%s'",
                spec,
                named,
            )
    return options


def _is_tar_spec(spec: str) -> bool:
    low = spec.lower()
    return ".tar" in low or low.endswith(".tgz")


def make_dataset(
    spec: str,
    size: int,
    seed: int = 0,
    random_crop: bool = True,
    hflip: bool = False,
    *,
    shuffle: bool = False,
    include_held_out: bool = False,
    allow_commands: bool = False,
) -> IterableDataset:
    """The dataset for the CLI's data SPEC (see ``SPEC_FORMS``) at ``size`` px.

    ``seed`` seeds the shapes stream, or the crops/flips (and with ``shuffle`` the order)
    of real images. Shapes ignore ``random_crop`` and ``hflip`` (a flip would contradict
    left/right captions). ``include_held_out`` lets the shapes stream render the held-out
    compositions (the tokenizer's stream: a codec reads no captions); generators never see them.
    ``allow_commands`` lets tar shards name URLs, which webdataset opens by running a program (``pipe:`` runs a
    shell command): only for a spec the user typed on the command line, never one read from a file.
    Unknown or nonexistent specs raise ``ValueError``.
    """
    spec = str(spec).strip()
    shapes = _shapes_options(spec, seed)
    if shapes is not None:
        from binlat.data.shapes import ShapesStream

        if hflip:
            logger.warning("hflip ignored for the shapes data: it would contradict left/right captions")
        try:
            return ShapesStream(size=size, exclude_held_out=not include_held_out, **shapes)
        except ValueError as exc:
            raise ValueError(f"bad shapes spec {spec!r}: {exc}") from exc
    if not spec:
        raise ValueError(f"empty data spec; expected {SPEC_FORMS}")
    transform = ImageTransform(size, random_crop=random_crop, hflip=hflip, seed=seed)
    expanded = os.path.expanduser(spec)
    if os.path.isdir(expanded):
        return ImageFolderDataset(expanded, transform, shuffle=shuffle, seed=seed)
    if spec.lower().endswith((".jsonl", ".csv")):
        if not os.path.isfile(expanded):
            raise ValueError(f"data spec {spec!r}: manifest file not found; expected {SPEC_FORMS}")
        return ManifestDataset(expanded, transform, shuffle=shuffle, seed=seed)
    if _is_tar_spec(spec):
        try:
            return WebDatasetShards(spec, transform, shuffle=shuffle, seed=seed, allow_commands=allow_commands)
        except ValueError as exc:
            raise ValueError(f"data spec {spec!r}: {exc}; expected {SPEC_FORMS}") from exc
    if os.path.exists(expanded):
        raise ValueError(f"data spec {spec!r} is a file that is neither a manifest nor a shard; expected {SPEC_FORMS}")
    raise ValueError(f"unknown data spec {spec!r} (no such file or directory); expected {SPEC_FORMS}")


# Every reader the SPEC can choose, and the image loader they all read with.
__all__ = [
    "IMAGE_EXTENSIONS",
    "SPEC_FORMS",
    "ImageFolderDataset",
    "ImageLoadError",
    "ManifestDataset",
    "WebDatasetShards",
    "expand_shards",
    "load_image",
    "make_dataset",
]
